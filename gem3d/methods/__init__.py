"""The generation methods: GEM-3D, the Make-A-Volume baseline, the paper's comparison methods and any added one.

`gem3d.methods.registry` lists them (one `Method` entry each, torch-free); each entry names the module that
implements it (`check`, `train`, `sampler`, `budget`), which the registry imports by name when it is used.
docs/architecture.md ("Adding a generation method") has the recipe.
"""
