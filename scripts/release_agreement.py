"""Agreement of gem3d's networks and sampler with the GEM-3D authors' own, on files in their release's layout.

The shared fixture (gem3d-release-layout: four runs in the release's exact layout, tiny and random, and
`reference.pt`, what the authors' networks compute from them) is read through gem3d's importer; this prints, per
run, the largest relative difference (max |gem3d - theirs| / max |theirs|) of every quantity `reference.pt` holds.
No network is trained; a few seconds on a CPU.

    python scripts/release_agreement.py --fixture ../shared/fixtures/gem3d-release-layout
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from einops import rearrange

from gem3d.data.latents import LoadedVAE
from gem3d.models import position_embedding
from gem3d.models.release_import import ddim_latents, first_stage_config, import_unet
from gem3d.models.vae import VAEConfig
from gem3d.models.vae_import import import_autoencoder
from gem3d.pretrained import find_run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def agreement(fixture: Path) -> list[dict]:
    ref = torch.load(fixture / "reference.pt", weights_only=False)
    rows = []
    for name in ("brain_stage1", "brain_stage2", "brain_base_stage2", "brain_slice"):
        r, run = ref[name], find_run(fixture / name)
        vae_cfg = VAEConfig(**first_stage_config(run))
        model, _ = import_autoencoder(run.checkpoint, vae_cfg)
        model.eval()
        post = model.encode(r["vae_in"][:, :1])
        row = {"run": name, "first stage mean": rel(post.mean, r["vae_mean"]),
               "first stage logvar": rel(post.logvar, r["vae_logvar"]),
               "first stage decoding": rel(model.decode(r["vae_mean"])[:, 0], r["vae_decoded"].mean(1))}
        for weights, key in (("live", "eps"), ("ema", "eps_ema")):
            if key not in r:
                continue
            net, _ = import_unet(run, weights)
            net.eval()
            if "position" in r:
                out = net(r["x_noisy"][:4], r["t"][:4], context=position_embedding(r["position"], net.config.context_dim))
            elif run.pseudo3d:
                x = rearrange(torch.cat([r["x_noisy"], r["cond"]], 1), "(b f) c h w -> b c f h w", f=16)
                out = rearrange(net(x, r["t"][:1]), "b c f h w -> (b f) c h w")
            else:
                out = net(torch.cat([r["x_noisy"], r["cond"]], 1), r["t"])
            row[f"eps ({weights})"] = rel(out, r[key])
        if "cond" in r:
            vae = LoadedVAE(model, run.scale_factor, "", max_label=3)
            parts = [rearrange(vae.encode_labels(ref["labels"].numpy()), "c d h w -> d c h w")]
            if r["cond"].shape[1] == 8:
                parts.append(vae.encode(ref["informed_image"]).expand(16, -1, -1, -1))
            row["conditioning from the raw window"] = rel(torch.cat(parts, 1), r["cond"])
            net, _ = import_unet(run, "live")
            z = ddim_latents(net, run, r["cond"], r["ddim10_eta0_xT"], steps=10)
            row["DDIM 10 latents"] = rel(z, r["ddim10_eta0_latents"])
            row["DDIM 10 images"] = rel(model.decode(z / run.scale_factor)[:, 0], r["ddim10_eta0_images"].mean(1))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=Path("../shared/fixtures/gem3d-release-layout"))
    args = parser.parse_args()
    rows = agreement(args.fixture)
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "run"))
    print("| quantity | " + " | ".join(r["run"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{r[key]:.1e}" if key in r else "" for r in rows) + " |")


if __name__ == "__main__":
    main()
