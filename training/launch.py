"""`python -m training.launch --config RECIPE [--max-steps N] [--output-dir D] [--resume auto|PATH] [key=value ...]`
(also under `accelerate launch -m training.launch ...` for many processes; overrides may come before or after
the options). A `task: bundle` recipe (tiny_shapes.yaml) runs its phases in one process, always resumes where it
stopped, and writes its model to `<output dir>/model` unless `bundle.out=` says where. A `task: distill` recipe given
`bundle.out=` copies its last checkpoint (trained first when missing) there as a model folder."""
import argparse
import logging
import sys

from .config import check_recipe, load_config, set_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. training/configs/tiny_shapes.yaml")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--output-dir", help="override train.output_dir")
    parser.add_argument("--resume", help="'auto' (latest checkpoint in the output dir, if any) or a checkpoint folder")
    parser.add_argument("--allow-batch-change", action="store_true",
                        help="resume although train.global_batch_size differs from the checkpoint's")
    parser.add_argument("overrides", nargs="*", help="recipe overrides as section.key=value (value parsed as YAML)")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.max_steps is not None:
            set_path(config, "train.max_steps", args.max_steps)
        if args.output_dir is not None:
            set_path(config, "train.output_dir", args.output_dir)
        check_recipe(config)
        if config.get("task") == "bundle":
            from .bundle import run_bundle

            run_bundle(config)
        elif (config.get("bundle") or {}).get("out"):  # a distilled student, copied out as a model folder
            from .bundle import bundle_student

            bundle_student(config)
        else:
            from .loop import train

            train(config, config["train"]["output_dir"], args.resume, args.allow_batch_change)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
