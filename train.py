"""Pretrain a hybrid layout on the embedded corpus (or your own text), then print a sample.

    python train.py                                      # layouts/tiny.yaml on CPU, a few minutes
    python train.py layouts/jamba.yaml model.d_model=384 train.steps=1000 train.lr=1e-3
    python train.py layouts/tiny.yaml --print-config     # the resolved layout and train config
    deepspeed --num_gpus 8 train.py layouts/jamba.yaml train.zero_stage=3 train.seq_len=4096

Arguments after the layout are omegaconf dotlist overrides: `train.*` keys set the run (listed below), every
other key overrides the layout (see layouts/README.md). Under the `deepspeed` launcher the run uses DeepSpeed
ZeRO (train.zero_stage) with a config generated from the train section, or your own --deepspeed_config JSON;
with train.expert_parallel > 1 (MoE experts split over ranks) it uses the torch engine, data parallel.
Checkpoints go to <train.out_dir>/checkpoints every train.save_every steps and at the end; rerunning the same
command resumes from the newest one. SIGTERM, SIGUSR1 or Ctrl-C (or train.max_wall_time running out) finish
the step, save a checkpoint and exit with status 75; a second signal exits at once. A mistake in the layout, an override or the data ends in one line naming
the key or file and exit status 2 (--debug shows the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hybrid import load_layout
from hybrid.errors import ConfigError, cli
from training.config import RunConfig, check, train_keys_help
from training.faults import PREEMPTED, Preempted
from training.loop import run

DEFAULT_LAYOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layouts", "tiny.yaml")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="train.* keys (key=default):\n" + train_keys_help())
    ap.add_argument("layout", nargs="?", default=DEFAULT_LAYOUT, help="layout YAML (default: layouts/tiny.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides: train.steps=100 model.d_model=512 ...")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--deepspeed_config", default=None, help="your own DeepSpeed JSON (else generated)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)
    if "=" in args.layout:  # only overrides were given
        args.overrides.insert(0, args.layout)
        args.layout = DEFAULT_LAYOUT
    train_over = [o for o in args.overrides if o.startswith("train.")]
    layout_over = [o for o in args.overrides if not o.startswith("train.")]
    name = os.path.splitext(os.path.basename(args.layout))[0]
    return args, train_config(name, train_over), layout_over


def train_config(name: str, overrides: list[str]):
    """The run config (structured, resolved) with `train.*` dotlist overrides; errors name the key."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"{o}: expected key=value")
    try:
        conf = OmegaConf.merge(OmegaConf.structured(RunConfig(name=name)), OmegaConf.from_dotlist(overrides))
        OmegaConf.resolve(conf)
        return conf
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        given = next((o for o in overrides if o.split("=", 1)[0] == key), key)
        why = str(e).split("\n")[0]
        if "not in 'TrainConfig'" in why:
            raise ConfigError(f"{given}: no such key; `python train.py --help` lists the train.* keys") from None
        raise ConfigError(f"{given}: {why}") from None


def main(argv=None) -> int:
    args, conf, layout_over = parse(argv)
    run_cfg: RunConfig = OmegaConf.to_object(conf)
    check(run_cfg.train)
    layout = load_layout(args.layout, layout_over)
    if args.print_config:
        from hybrid.layout import layout_to_dict
        print(OmegaConf.to_yaml(OmegaConf.create({"layout": layout_to_dict(layout), "train": conf.train})))
        if run_cfg.train.expert_parallel > 1:
            print("# train.expert_parallel > 1: the torch engine runs it (DeepSpeed ZeRO cannot), no DeepSpeed config")
        elif args.deepspeed_config is None:
            from training.engines import DeepSpeedEngine
            world = int(os.environ.get("WORLD_SIZE", "1"))
            print(f"# DeepSpeed config generated under the deepspeed launcher ({world} rank{'s' * (world > 1)}):")
            print(OmegaConf.to_yaml(OmegaConf.create(DeepSpeedEngine.config(run_cfg.train, True, world_size=world))))
        return 0
    try:
        run(layout, run_cfg, layout_path=args.layout, deepspeed_config=args.deepspeed_config)
    except Preempted:  # a signal or train.max_wall_time: the checkpoint is written and its path printed
        return PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
