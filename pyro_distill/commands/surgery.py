"""``pyro-distill plan`` and ``pyro-distill distill``: MLP surgery from the command line.

* ``pyro-distill plan --teacher 64,32,32,10 --student 64,16,10 [--selector S --posterior models/<name>] [--json]``
  prints the operations that turn the teacher architecture into the student architecture. Both commands
  default to the ``snr`` selector; it ranks neurons by the posterior, so ``plan`` without ``--posterior``
  uses ``random`` instead and says so (the operations are the same, the neurons chosen differ);
* ``pyro-distill distill models/<teacher> --student 64,16,10 [--selector evidence] --out models/<name>`` conditions
  the saved teacher posterior along that plan and saves the student's prior as a model folder (``posterior.pt``
  and ``prior.pt`` hold the same Gaussian over the student's weights; the card holds the plan). Never overwrites.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register", "run_plan", "run_distill", "DEFAULT_SELECTOR", "SELECTOR_NAMES"]

#: the selector ``plan`` and ``distill`` use unless told (``surgery.plan.SELECTORS`` keys; a test keeps them equal,
#: listed here so that ``--help`` does not import torch)
SELECTOR_NAMES = ("evidence", "first", "last", "magnitude", "random", "snr")
DEFAULT_SELECTOR = "snr"
#: the selector ``plan`` falls back to without a posterior (snr and evidence need one)
NO_POSTERIOR_SELECTOR = "random"


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layer sizes must be comma-separated integers like 64,32,10, got {text!r}") from None
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"need at least input and output sizes, all positive, got {text!r}")
    return sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="print the surgery plan that turns a teacher MLP into a student MLP",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=_sizes, default=None,
                   help="teacher sizes, e.g. 64,32,32,10 (or give --posterior and its network is used)")
    p.add_argument("--student", type=_sizes, required=True, help="student sizes, e.g. 64,16,10")
    p.add_argument("--activation", default="relu", help="activation of both nets without --posterior (relu)")
    p.add_argument("--no-bias", action="store_true", help="bias-free nets (without --posterior)")
    p.add_argument("--posterior", default=None, help="teacher model folder (models/<name>) for the selector")
    p.add_argument("--selector", choices=SELECTOR_NAMES, default=None,
                   help=f"how neurons are chosen (default: {DEFAULT_SELECTOR}, as distill; without --posterior "
                        f"{NO_POSTERIOR_SELECTOR}, and plan says so)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random selector")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)

    d = subparsers.add_parser("distill", help="condition a saved teacher posterior into a student prior",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("teacher", help="teacher model folder (models/<name>)")
    d.add_argument("--student", type=_sizes, required=True, help="student sizes, e.g. 64,16,10")
    d.add_argument("--selector", choices=SELECTOR_NAMES, default=DEFAULT_SELECTOR,
                   help=f"how neurons are chosen (default {DEFAULT_SELECTOR})")
    d.add_argument("--seed", type=int, default=0, help="seed of the random selector")
    d.add_argument("--out", required=True, help="new model folder for the student prior (must not exist)")
    d.add_argument("--idata-draws", type=int, default=1000,
                   help="draws in the ArviZ idata.nc written beside it when the teacher's card names its data "
                        "(default 1000; 0: none)")
    d.set_defaults(func=run_distill)


def _student_like(teacher, sizes: list[int]):
    return teacher.replace(sizes=sizes)


def run_plan(args: argparse.Namespace) -> int:
    from ..nets.mlp import MLP
    from ..store import load_model
    from ..surgery.plan import plan

    posterior = None
    if args.posterior is not None:
        teacher, posterior, _ = load_model(args.posterior)
        if args.teacher is not None and list(args.teacher) != list(getattr(teacher, "sizes", [])):
            raise ValueError(f"--teacher {args.teacher} does not match the posterior's network {teacher!r}; "
                             "drop --teacher or pass the matching sizes")
    elif args.teacher is None:
        raise ValueError("give the teacher: --teacher 64,32,32,10 or --posterior models/<name>")
    else:
        teacher = MLP(args.teacher, activation=args.activation, bias=not args.no_bias)
    if not isinstance(teacher, MLP):
        raise ValueError(f"plan works on MLPs; {args.posterior} holds {teacher!r}")
    selector = args.selector or (DEFAULT_SELECTOR if posterior is not None else NO_POSTERIOR_SELECTOR)
    if args.selector is None:
        why = ("the default, as in distill" if posterior is not None else
               f"{DEFAULT_SELECTOR}, distill's default, ranks neurons by the teacher posterior; pass --posterior "
               "models/<teacher> to see the neurons distill removes")
        print(f"selector: {selector} ({why})", file=sys.stderr if args.json else sys.stdout)
    pl = plan(teacher, _student_like(teacher, args.student), selector=selector, posterior=posterior, seed=args.seed)
    if args.json:
        print(json.dumps(pl.to_dict(), indent=2))
    else:
        print(f"teacher {teacher.sizes} -> student {pl.student['sizes']}")
        print(pl)
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from ..nets.mlp import MLP
    from ..store import MODEL_FILE, PRIOR_FILE, data_spec, load_model, save_model
    from ..surgery import apply
    from ..surgery.plan import plan

    out = Path(args.out)
    if (out / MODEL_FILE).exists() or (out / PRIOR_FILE).exists():
        raise FileExistsError(f"{out} already holds a model; choose another --out")
    teacher, posterior, card = load_model(args.teacher)
    if not isinstance(teacher, MLP):
        raise ValueError(f"distill works on MLPs; {args.teacher} holds {teacher!r}")
    pl = plan(teacher, _student_like(teacher, args.student), selector=args.selector, posterior=posterior,
              seed=args.seed)
    student, prior = apply(pl, teacher, posterior)
    student_card = {
        "role": "student prior (teacher posterior conditioned by surgery; not fitted to data)",
        "teacher": str(args.teacher),
        "plan": pl.to_dict(),
    }
    if "data" in card:
        student_card["data"] = card["data"]
    save_model(out, student, prior, card=student_card, prior=prior)
    if args.idata_draws > 0 and data_spec(card) is not None:
        # the conditioned teacher's draws on the teacher's data, for ArviZ
        from ..data.specs import load
        from ..diagnostics import diagnose_model_folder

        try:
            ds = load(data_spec(card))
            diagnose_model_folder(out, ds.X, ds.y, draws=args.idata_draws)
        except (ValueError, FileNotFoundError) as exc:  # the prior is saved; the netCDF can be made later
            print(f"idata.nc not written ({exc}); make it with `pyro-distill diagnose {out} --data NAME`")
        else:
            print(f"wrote {out / 'idata.nc'} ({args.idata_draws} draws of the student prior on the teacher's data)")
    print(f"teacher {teacher.sizes} -> student {student.sizes} ({prior.kind} Gaussian, p={prior.dim})")
    print(pl)
    print(f"saved {out}")
    return 0
