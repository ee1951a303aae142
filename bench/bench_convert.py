"""Conversion cost and quantization quality on the test model (SmolLM2-135M as HF float32).

1. `crofter convert HF --outtype f16` in a child process: wall time and peak RSS, next to
   the anchor of loading the same checkpoint eagerly with transformers (what a converter
   that holds the whole model in memory pays), and the checkpoint's size on disk.
2. Q4_K_M vs F16 on /usr/share/common-licenses/GPL-3: perplexity, mean KL divergence and
   same-top-token rate, without and with an importance matrix computed on *other*
   texts (Apache-2.0, MPL-2.0, LGPL-2.1). Goal: calibration cuts mean KLD by >= 35%.

    python bench/bench_convert.py --hf DIR      (DIR: the dequantized checkpoint; built if omitted)
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIC = Path("/usr/share/common-licenses")


def build_hf(out: Path) -> Path:
    from converter.hf import gguf_to_checkpoint
    from models.bundled import bundled_gguf

    return gguf_to_checkpoint(bundled_gguf(), out)


def child(code: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(code, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = args.hf or build_hf(tmp / "hf")
        size = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
        f16 = tmp / "smol-F16.gguf"
        # Each measurement in a fresh child: ru_maxrss of RUSAGE_CHILDREN is the max over children,
        # so the anchor (larger) runs last.
        wall, rss = child([sys.executable, "-m", "app.cli", "convert", str(hf), "--out", str(f16), "--no-verify",
                           "--no-register"])
        anchor = ("import torch; from transformers import AutoModelForCausalLM as A; "
                  f"m = A.from_pretrained({str(hf)!r}, dtype=torch.float32); "
                  "sd = {k: v.half().numpy() for k, v in m.state_dict().items()}")
        awall, arss = child([sys.executable, "-c", anchor])
        print(f"checkpoint {size:.0f} MiB (float32 safetensors)")
        print(f"crofter convert f16: {wall:.1f} s wall, peak RSS {rss:.0f} MiB")
        print(f"anchor eager transformers load + f16 copy: {awall:.1f} s, peak RSS {arss:.0f} MiB")
        print(f"ratio peak RSS crofter/anchor {rss / arss:.2f}")

        from converter.imatrix import compute_imatrix
        from converter.quantize import quantize
        from converter.verify import quant_report

        text = (LIC / "GPL-3").read_text()
        calib = tmp / "calib.txt"
        calib.write_text("".join((LIC / n).read_text() for n in ("Apache-2.0", "MPL-2.0", "LGPL-2.1")))
        plain = quantize(f16, tmp / "q.gguf", "Q4_K_M")
        im = compute_imatrix(hf, calib, max_tokens=16384)
        cal = quantize(f16, tmp / "qc.gguf", "Q4_K_M", imatrix=im)
        r0 = quant_report(f16, plain.path, text)
        r1 = quant_report(f16, cal.path, text)
        for label, r in (("Q4_K_M", r0), ("Q4_K_M + imatrix", r1)):
            print(f"{label:18s} PPL {r['ppl_base']:.3f} -> {r['ppl_quant']:.3f}  mean KLD {r['mean_kld']:.4f}  "
                  f"same top token {100 * r['same_top_token']:.1f}%  ({r['tokens_scored']} tokens)")
        print(f"calibration cuts mean KLD by {100 * (1 - r1['mean_kld'] / r0['mean_kld']):.1f}% (goal >= 35%)")


if __name__ == "__main__":
    main()
