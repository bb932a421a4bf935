"""How often the shapes detector reads what a person sees, on the bundled model's own clips.

    python -m benchmarks.detector_agreement [--model assets/models/pyramid-flow-shapes] [--count N] [--out FIGURES.json]

`benchmarks/shape_labels_by_eye.json` holds the shape a person saw in each of the bundled model's text-to-video
and image-to-video clips of the held-out pairs (how they were shown is in its "how"). Each clip is generated again
with the model's sampling defaults (sampling is seeded, so it is the clip that was labelled) and read by
`training.shapes_detector`. Reported per task: agreement of the detector with the eye, the share of clips
whose shape matches the prompt by the detector and by the eye, and the counts of (eye, detector) readings.
"""
import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from training.evaluate_shapes import image_to_video_frames, report, text_to_video_frames
from training.shapes_detector import read_clip
from training.shapes_world import parse_prompt

LABELS = Path(__file__).with_name("shape_labels_by_eye.json")
FRAMES_OF = {"text_to_video": text_to_video_frames, "image_to_video": image_to_video_frames}


def transformer_sha256(model: Path) -> str:
    weights = sorted((model / "diffusion_transformer_64p").glob("*.safetensors"))
    return hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()


def agreement(readings: list) -> dict:
    """Figures of [(prompt shape, eye, detector)] readings of one task."""
    share = lambda hits: round(sum(hits) / len(readings), 4)
    return {
        "clips": len(readings),
        "detector_agrees_with_eye": share(eye == seen for _, eye, seen in readings),
        "prompt_shape_by_detector": share(asked == seen for asked, _, seen in readings),
        "prompt_shape_by_eye": share(asked == eye for asked, eye, _ in readings),
        "eye_vs_detector": {f"{eye} / {seen}": n for (eye, seen), n in sorted(Counter((e, str(s)) for _, e, s in readings).items())},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detector_agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("assets/models/pyramid-flow-shapes"))
    parser.add_argument("--count", type=int, help="labelled clips per task (default: all)")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    labels = json.loads(LABELS.read_text())
    if transformer_sha256(args.model) != labels["transformer_sha256"]:
        print(f"{args.model} is not the model whose clips were labelled ({labels['model']}, transformer sha256 "
              f"{labels['transformer_sha256'][:12]}…): its clips differ, so the labels do not apply", file=sys.stderr)
        return 2
    from model_core.pipeline import PyramidFlowPipeline

    pipe = PyramidFlowPipeline.from_pretrained(args.model, device="cpu")
    options = pipe.family.sampling.call_options("text_to_video")
    figures = {"model": str(args.model)}
    for task, frames_for in FRAMES_OF.items():
        frames_of = frames_for(pipe, options)
        clips = [c for c in labels["clips"] if c["task"] == task][: args.count]
        figures[task] = agreement([(parse_prompt(c["prompt"])[1], c["by_eye"], read_clip(frames_of(c["prompt"], c["seed"])).shape)
                                   for c in clips])
    report(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
