"""One row of docs/results.md's sampler table from a run's sampled sets: test fidelity of test_gem3d (Table 2's
row) and FID-A/C/S of IC (Table 1's row), without the other sets the tables need.

    gem3d sample --set IC --config C && gem3d merge-samples --set IC --config C
    gem3d sample --set test_gem3d --config C && gem3d merge-samples --set test_gem3d --config C
    python scripts/solver_row.py C "DDIM 100, eta 0"
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gem3d.config import load_config  # noqa: E402
from gem3d.data.slice_store import SliceStore  # noqa: E402
from gem3d.evaluation.quality import fidelity_table, pooled_fid  # noqa: E402
from gem3d.evaluation.stages import load_extractor  # noqa: E402
from gem3d.paths import Paths  # noqa: E402
from gem3d.sampling.sets import TEST_TRUE, TRAIN_MASKS, SampleSet  # noqa: E402

cfg = load_config(sys.argv[1], check_paths=False)
label = sys.argv[2]
store = SliceStore(Paths(cfg).slices)
test = fidelity_table(store, [SampleSet.open(cfg, "test_gem3d", TEST_TRUE)], None, "not computed").iloc[0]
extractor, _ = load_extractor(cfg)
fid, n = pooled_fid(store, [SampleSet.open(cfg, "IC", TRAIN_MASKS)], extractor, cfg.evaluation.fid_batch_size)
print(f"ROW {label} | MS-SSIM {test['MS-SSIM']:.3f} | PSNR {test['PSNR']:.2f} | SSIM {test['SSIM']:.3f} | "
      f"FID-A {fid['axial']:.3f} | FID-C {fid['coronal']:.3f} | FID-S {fid['sagittal']:.3f} | n {n} | "
      f"{time.strftime('%H:%M:%S')}", flush=True)
