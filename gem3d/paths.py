"""Where every stage reads and writes, in one place (used by the CLI and by the Snakefile).

    results/<name>/
        phantoms/                 synthetic demo data (only when the config has `phantoms:`)
        nnunet/raw/Dataset<id>_<name>/          nnU-Net raw dataset written by `gem3d import`
        nnunet/preprocessed/Dataset<id>_<name>/ nnU-Net 3d_fullres preprocessing
        split.json, import_report.json, input_digest_cache.json (hashes of the input files)
        slices/                   slice store (index.json + <case>_*.npy)
        models/<model>.pt         trained networks (vae, slice_model, volume_stage1/2, baseline_stage1/2)
        train_state/<model>.ckpt  resumable training state (kept out of Snakemake's outputs)
        latents/                  latent cache (index.json + <case>.pt)
        samples/<set>/            generated sets (manifest.json, slices/, imagesTr/, labelsTr/, dataset.json)
        evaluation/, tables/, figures/, report.html
        logs/<rule>.log           each stage's own log
        benchmarks/<rule>.tsv     Snakemake's wall time and memory of each stage
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gem3d.config import Config


@dataclass(frozen=True)
class Paths:
    cfg: Config

    @property
    def root(self) -> Path:
        return self.cfg.results_dir

    @property
    def input_data(self) -> Path:
        return Path(self.cfg.data.path)

    @property
    def phantoms_manifest(self) -> Path:
        return self.input_data / "phantoms.json"

    @property
    def nnunet(self) -> Path:
        return self.root / "nnunet"

    @property
    def raw_dataset(self) -> Path:
        return self.nnunet / "raw" / self.cfg.nnunet_dataset_name

    @property
    def preprocessed_dataset(self) -> Path:
        return self.nnunet / "preprocessed" / self.cfg.nnunet_dataset_name

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def import_report(self) -> Path:
        return self.root / "import_report.json"

    @property
    def input_digest_cache(self) -> Path:
        """Hashes of the input files by size and times (gem3d.data.input_digest), kept between readings."""
        return self.root / "input_digest_cache.json"

    @property
    def generate_digest_cache(self) -> Path:
        """Hashes of `gem3d generate`'s own input files (generation.masks, region, informed_image)."""
        return self.root / "generate_digest_cache.json"

    @property
    def slices(self) -> Path:
        return self.root / "slices"

    def model(self, name: str) -> Path:
        return self.root / "models" / f"{name}.pt"

    def train_state(self, name: str) -> Path:
        return self.root / "train_state" / f"{name}.ckpt"

    @property
    def vae_metrics(self) -> Path:
        return self.root / "models" / "vae_metrics.json"

    @property
    def latents(self) -> Path:
        return self.root / "latents"

    def samples(self, name: str) -> Path:
        """A generated set: manifest.json, slices/<id>.npz, imagesTr/, labelsTr/, dataset.json."""
        return self.root / "samples" / name

    def sample_shard(self, name: str, shard: int, shards: int) -> Path:
        return self.root / "samples" / "shards" / f"{name}.{shard}of{shards}"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def log(self, rule: str) -> Path:
        return self.root / "logs" / f"{rule}.log"

    def benchmark(self, rule: str) -> Path:
        return self.root / "benchmarks" / f"{rule}.tsv"
