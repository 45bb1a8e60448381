"""``pyro-distill diagnose models/<name> [--against models/<other> ...]``: ArviZ table and figures.

For every model folder: PSIS-LOO, WAIC and the posterior k-hat on the training split of its data, the
held-out log predictive density and accuracy, and ``az.compare`` across the models. A student whose
folder holds its prior (``prior.pt``, with the surgery in its metadata or a ``plan`` in the card) and
whose teacher is among the models also gets a row for that prior, the conditioned teacher, judged
against the teacher's prior restricted to the student's coordinates (the exact target of conditioning).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "run_note"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose", help="ArviZ diagnostics (LOO, WAIC, k-hat, compare) and figures for model folders",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder (models/<name>), or a run's folder of model folders "
                   "(models/<experiment>-<timestamp>: every model on its own data, mean +- sd over seeds)")
    p.add_argument("--against", nargs="+", action="extend", default=[], metavar="FOLDER",
                   help="more model folders to compare (teacher, students)")
    p.add_argument("--data", default=None, help="data set when the card has no \"data\" spec (e.g. digits)")
    p.add_argument("--split-seed", type=int, default=0, help="split seed with --data (default 0)")
    p.add_argument("--draws", type=int, default=1000, help="draws from each Gaussian (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="figure folder (default figures/diagnostics/<model name>)")
    p.add_argument("--no-save", action="store_true", help="do not write idata.nc into the model folders")
    p.add_argument("--overwrite", action="store_true", help="replace an idata.nc made with other settings")
    p.add_argument("--no-prior-row", action="store_true", help="skip the student-prior (conditioned teacher) rows")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import diagnostics as D
    from ..diagnostics import _resolve_prior
    from ..store import load_model

    root = Path(args.model)
    if root.is_dir() and not (root / "card.json").exists() and any(root.glob("*/card.json")):
        return run_folder(args, root)
    folders = [root] + [Path(f) for f in args.against]
    entries: dict[str, dict[str, Any]] = {}
    for f in folders:
        net, q, card = load_model(f)
        name = f.name if f.name not in entries else str(f)
        prior, src = _resolve_prior(f, net, card)
        entries[name] = {"folder": f, "net": net, "q": q, "card": card, "prior": prior,
                         "has_prior": src != "default prior"}
        run_note(card, f)
    # a data spec is a dict ({"name": "digits", "split_seed": 0}); a free-text "data" is only a description
    specs = {json.dumps(e["card"]["data"], sort_keys=True) for e in entries.values()
             if isinstance(e["card"].get("data"), dict)}
    if len(specs) > 1:
        raise ValueError(f"the models were fitted on different data ({sorted(specs)}); diagnose them separately")
    if specs:
        spec = json.loads(specs.pop())
    elif args.data:
        spec = {"name": args.data, "split_seed": args.split_seed}
    else:
        raise ValueError("no card has a \"data\" spec (a dict like {\"name\": \"digits\", \"split_seed\": 0}); "
                         "pass --data (e.g. --data digits --split-seed 0)")
    ds = D.load_data_spec(spec)
    X, y, Xte, yte = ds.X, ds.y, ds.Xte, ds.yte

    models: dict[str, tuple] = {}
    idatas = {}
    relations = []  # (student, teacher, ops)
    for name, e in entries.items():
        idatas[name] = D.diagnose_model_folder(e["folder"], X, y, draws=args.draws, seed=args.seed,
                                               prior=e["prior"], overwrite=args.overwrite, save=not args.no_save)
        models[name] = (e["net"], e["q"], e["prior"])
    for name, e in entries.items():
        ops_d = D.surgery_of(e["card"], e["prior"] if e["has_prior"] else None)
        found = D.find_teacher(ops_d, e["net"], {n: t["net"] for n, t in entries.items()}) if ops_d else None
        if not found:
            continue
        tname, ops = found
        relations.append((name, tname, ops))
        if e["has_prior"] and not args.no_prior_row and not _same_gaussian(e["q"], e["prior"]):
            # (a `distill` folder's posterior IS its prior: one row, not two identical ones)
            pname = f"{name} prior"
            idatas[pname], target = D.student_prior_idata(e["net"], e["prior"], entries[tname]["net"],
                                                          entries[tname]["prior"], ops, X, y, draws=args.draws,
                                                          seed=args.seed, teacher_name=tname)
            models[pname] = (e["net"], e["prior"].to(dtype=X.dtype), target)
    # order: teachers first, then each student's prior, then the students
    order = [n for n in entries if n not in {r[0] for r in relations}]
    for s, _, _ in relations:
        order += [n for n in (f"{s} prior", s) if n in models and n not in order]
    order += [n for n in models if n not in order]
    models = {n: models[n] for n in order}
    rows, idatas, cmp = D.diagnose(models, X, y, Xte, yte, draws=args.draws, seed=args.seed,
                                   idatas={n: idatas[n] for n in order})
    table = D.format_table(rows, cmp)
    print(f"data: {ds.description}; LOO/WAIC/k-hat on the training split (N={X.shape[0]}), "
          f"test lpd/acc on the test split (N={Xte.shape[0]}); {args.draws} draws per model")
    print(table)

    out = Path(args.out) if args.out else Path("figures") / "diagnostics" / folders[0].name
    out.mkdir(parents=True, exist_ok=True)
    from ..store import atomic_write_text

    atomic_write_text(out / "table.txt", table + "\n")
    atomic_write_text(out / "diagnose.json", json.dumps(
        {"data": spec, "draws": args.draws, "seed": args.seed, "rows": [r.to_dict() for r in rows],
         "compare": None if cmp is None else json.loads(cmp.drop(columns=["warning", "scale"], errors="ignore")
                                                       .to_json(orient="index"))}, indent=2))
    if not args.no_figures:
        for path in make_figures(idatas, relations, entries, models, out):
            print(f"wrote {path}")
    return 0


def _same_gaussian(a: Any, b: Any) -> bool:
    """Both Gaussians have the same structure and the same tensors (e.g. a distill folder's posterior and prior)."""
    import torch

    if type(a) is not type(b):
        return False
    ta, tb = a._tensors(), b._tensors()
    return ta.keys() == tb.keys() and all(
        ta[k].shape == tb[k].shape and torch.equal(ta[k].double(), tb[k].double()) for k in ta)


def run_folder(args: argparse.Namespace, root: Path) -> int:
    """All model folders of one experiment run: per-seed rows and the table over seeds."""
    from .. import diagnostics as D
    from ..store import atomic_write_text

    if args.against:
        raise ValueError(f"{root} is a run's folder of models: diagnose it alone (no --against), or pass "
                         "single model folders")
    print(f"diagnosing every model folder in {root} ({args.draws} draws each)")
    cards = sorted(root.glob("*/card.json"))
    if cards:
        try:
            run_note(json.loads(cards[0].read_text()), root)
        except (OSError, ValueError):
            pass
    first_seed = min(D.split_seed(d.name)[1] for d in root.iterdir() if (d / "card.json").exists())
    res = D.diagnose_run(root, draws=args.draws, seed=args.seed, overwrite=args.overwrite, save=not args.no_save,
                         prior_rows=not args.no_prior_row, progress=True,
                         keep_seed=None if args.no_figures else first_seed)
    kept = res.pop("kept", None)
    table = D.format_run_table(res)
    print(table)
    out = Path(args.out) if args.out else Path("figures") / "diagnostics" / root.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_text(out / "diagnose_run.json", json.dumps(res, indent=2))
    print(f"wrote {out / 'table.md'} and {out / 'diagnose_run.json'}")
    if kept and kept["models"]:
        for path in figures_of_kept(kept, out):
            print(f"wrote {path}")
    return 0


def run_note(card: dict[str, Any], folder: Path) -> str | None:
    """For a model saved by an experiment run: one stderr line when that run is not a complete full run
    (``died``, ``running``, ``interrupted``, ``failed``, or ``--quick``), so its numbers are not taken for the
    published ones. Returns the line."""
    import sys

    from ..experiments.core import run_state

    rd = card.get("run_dir") if isinstance(card, dict) else None
    if not rd:
        return None
    st = run_state(rd)
    state = st["state"]
    if state == "unknown" and not Path(rd).exists():
        return None
    msg = None
    if state != "complete":
        why = st.get("died_because") or st.get("reason") or ""
        msg = f"note: {folder} comes from run {rd}, whose state is {state}{' (' + why + ')' if why else ''}"
    elif st.get("quick"):
        msg = f"note: {folder} comes from the --quick smoke run {rd}"
    if msg:
        print(msg, file=sys.stderr)
    return msg


def figures_of_kept(kept: dict[str, Any], out: Path) -> list[Path]:
    """The figures of one seed of a run: the teacher, the first student's prior (the conditioned teacher)
    and every student of that architecture (each tempering, the standard prior), each on its own data."""
    ms = kept["models"]
    rel = kept["relations"][:1]
    if rel:
        sname, tname, _ = rel[0]
        cfg = ms[sname]["net"].config()
        names = [tname, f"{sname} prior", sname] + sorted(
            n for n, m in ms.items() if n not in (tname, sname) and not n.endswith(" prior")
            and m["net"].config() == cfg)
    else:
        names = list(ms)
    entries = {n: {"net": ms[n]["net"], "q": ms[n]["q"]} for n in names}
    models = {n: (ms[n]["net"], ms[n]["q"], ms[n]["prior"]) for n in names}
    return make_figures({n: ms[n]["idata"] for n in names}, rel, entries, models, out)


def make_figures(idatas: dict, relations: list, entries: dict, models: dict, out: Path) -> list[Path]:
    """k-hat and PPC figures for all models; forest and correlation heatmaps for the first teacher/student
    pair (teacher coordinates mapped onto the student's names)."""
    import torch

    from .. import diagnostics as D
    from ..plots import diagnostics as P

    paths = [P.plot_khat(idatas, out / "khat.png"), P.plot_ppc(idatas, out / "ppc.png")]
    if not relations:
        return paths
    sname, tname, ops = relations[0]
    snet, tnet = entries[sname]["net"], entries[tname]["net"]
    idx = D.student_to_teacher_index(ops, tnet)
    wt = D.weights_from_idata(idatas[tname], tnet)[..., idx]
    forest = {f"{tname} (kept coords)": D.posterior_only_idata(snet, wt)}
    if f"{sname} prior" in idatas:
        forest[f"{sname} prior"] = idatas[f"{sname} prior"]
    forest[sname] = idatas[sname]
    biases = [b.name for b in snet.layout if b.name.endswith("bias")] or snet.layout.names[:1]
    dims, _ = D.block_dims(snet)
    coords = {dims[b][0]: list(range(min(8, snet.layout.shape(b)[0]))) for b in biases}
    paths.append(P.plot_forest_compare(forest, biases, out / "forest.png", coords=coords,
                                       title=f"{tname} -> {sname}: biases (first 8 units) before vs after"))
    weights = [b for b in snet.layout if b.name.endswith("weight")] or list(snet.layout)
    blk = weights[-1]
    sidx = torch.arange(blk.offset, blk.stop)
    covs = {f"{tname} (before removal)": entries[tname]["q"].marginalize(idx[sidx]).covariance()}
    if f"{sname} prior" in models:
        covs[f"{sname} prior (conditioned)"] = models[f"{sname} prior"][1].marginalize(sidx).covariance()
    covs[f"{sname} posterior"] = entries[sname]["q"].marginalize(sidx).covariance()
    paths.append(P.plot_correlation_before_after(
        {k: v.detach().double().numpy() for k, v in covs.items()}, out / "correlation.png",
        title=f"correlation of {sname}'s {blk.name} ({blk.numel} coords) before and after removal"))
    return paths
