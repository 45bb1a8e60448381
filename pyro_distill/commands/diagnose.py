"""``pyro-distill diagnose models/<name> [--against models/<other> ...]``: ArviZ table and figures.

For every model folder: PSIS-LOO, WAIC and the posterior k-hat on the training split of its data, the
held-out log predictive density and accuracy, and ``az.compare`` across the models. A student whose
folder holds its prior (``prior.pt``, with the surgery in its metadata or a ``plan`` in the card) and
whose teacher is among the models also gets a row for that prior, the conditioned teacher, judged
against the teacher's prior restricted to the student's coordinates (the exact target of conditioning).

Each model's data come from its card's data spec (``pyro_distill.data.specs``: every generator parameter, the
validation carve-out and the training subsample), so every kind's saved models (MLP, RNN, transformer) are
re-diagnosed on exactly the data they were fitted to. The surgery replay that finds a student's teacher lives
here (:func:`relate`), not in ``diagnostics``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "run_note", "relate", "surgery_of", "find_teacher", "student_to_teacher_index",
           "restricted_prior"]


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
    from ..data import specs as data_specs
    from ..store import is_model_folder, model_folders, open_model

    root = Path(args.model)
    if root.is_dir() and not is_model_folder(root) and model_folders(root):
        return run_folder(args, root)
    folders = [root] + [Path(f) for f in args.against]
    entries: dict[str, dict[str, Any]] = {}
    for f in folders:
        m = open_model(f)
        name = f.name if f.name not in entries else str(f)
        entries[name] = {"folder": f, "net": m.net, "q": m.posterior, "card": m.card, "prior": m.prior_or_default(),
                         "has_prior": m.has_prior, "model": m}
        run_note(m.card, f)
    # a data spec is a dict ({"name": "digits", "split_seed": 0}); a free-text "data" is only a description
    specs = {json.dumps(data_specs.complete(e["model"].data_spec), sort_keys=True) for e in entries.values()
             if e["model"].data_spec is not None}
    if len(specs) > 1:
        raise ValueError(f"the models were fitted on different data ({sorted(specs)}); diagnose them separately")
    if specs:
        spec = json.loads(specs.pop())
    elif args.data:
        spec = {"name": args.data, "split_seed": args.split_seed}
    else:
        raise ValueError("no card has a \"data\" spec (a dict like {\"name\": \"digits\", \"split_seed\": 0}); "
                         "pass --data (e.g. --data digits --split-seed 0)")
    ds = data_specs.load(spec)
    X, y, Xte, yte = ds.X, ds.y, ds.Xte, ds.yte

    models: dict[str, tuple] = {}
    idatas = {}
    relations = []  # (student, teacher, ops)
    for name, e in entries.items():
        idatas[name] = D.diagnose_model_folder(e["folder"], X, y, draws=args.draws, seed=args.seed,
                                               prior=e["prior"], overwrite=args.overwrite, save=not args.no_save)
        models[name] = (e["net"], e["q"], e["prior"])
    for name, e in entries.items():
        ops_d = surgery_of(e["card"], e["prior"] if e["has_prior"] else None)
        found = find_teacher(ops_d, e["net"], {n: t["net"] for n, t in entries.items()}) if ops_d else None
        if not found:
            continue
        tname, ops = found
        relations.append((name, tname, ops))
        if e["has_prior"] and not args.no_prior_row and not _same_gaussian(e["q"], e["prior"]):
            # (a `distill` folder's posterior IS its prior: one row, not two identical ones)
            pname = f"{name} prior"
            dt = X.dtype if X.is_floating_point() else None
            target = restricted_prior(entries[tname]["net"], ops, entries[tname]["prior"]).to(dtype=dt)
            idatas[pname] = D.student_prior_idata(e["net"], e["prior"], target, X, y, draws=args.draws,
                                                  seed=args.seed, teacher_name=tname)
            models[pname] = (e["net"], e["prior"].to(dtype=dt), target)
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
    from ..data import specs as data_specs
    from ..store import atomic_write_text, model_folders, parse_model_folder_name

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
    first_seed = min(parse_model_folder_name(d.name)[1] for d in model_folders(root))
    res = D.diagnose_run(root, load_data=data_specs.load, relate=None if args.no_prior_row else relate,
                         draws=args.draws, seed=args.seed, overwrite=args.overwrite, save=not args.no_save,
                         progress=True, keep_seed=None if args.no_figures else first_seed)
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
    idx = student_to_teacher_index(ops, tnet)
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


# ============================================================================ surgery replay (for the prior rows)
def student_to_teacher_index(ops: Sequence, teacher: Any) -> Any:
    """For each student flat coordinate, the teacher flat coordinate it came from (operations replayed)."""
    import torch

    net = teacher
    idx = torch.arange(teacher.num_params)
    for op in ops:
        idx = idx[op.keep(net)]
        net = op.architecture(net)
    return idx


def restricted_prior(teacher: Any, ops: Sequence, prior: Any = None) -> Any:
    """The teacher's prior (float64) on the coordinates the student keeps. For an independent teacher prior,
    the exact teacher posterior conditioned on the removed coordinates IS the student's posterior under this
    prior, so it is the target against which the conditioned teacher (student prior) is judged."""
    import torch

    prior = (prior if prior is not None else teacher.default_prior(torch.float64)).to(dtype=torch.float64)
    g = prior.marginalize(student_to_teacher_index(ops, teacher))
    g.meta = {"source": "teacher prior restricted to the student's coordinates"}
    return g


def surgery_of(card: Mapping[str, Any], prior: Any = None) -> list[dict] | None:
    """The surgery (a list of operation dicts) that made a student: from its prior's metadata, else the
    card's ``plan`` / ``surgery`` entry; None for a model made without surgery."""
    if prior is not None and prior.meta.get("surgery"):
        return list(prior.meta["surgery"])
    for key in ("plan", "surgery"):
        v = card.get(key)
        if isinstance(v, dict) and "ops" in v:
            return list(v["ops"])
        if isinstance(v, dict) and "op" in v:  # one operation's to_dict() (the RNN kind's "surgery")
            return [v]
        if isinstance(v, list):
            return v
    return None


def find_teacher(ops_d: Sequence[Mapping[str, Any]], student: Any,
                 candidates: Mapping[str, Any]) -> tuple[str, list] | None:
    """The first of ``candidates`` (name -> net) that ``ops_d`` turns into ``student``'s architecture,
    with the rebuilt operations; None when none does."""
    from ..surgery import operation_from_dict

    ops = [operation_from_dict(d) for d in ops_d]
    for name, net in candidates.items():
        t = net
        try:
            for op in ops:
                t = op.architecture(t)
        except Exception:  # noqa: BLE001 - not this model's plan
            continue
        if t.config() == student.config() and net.config() != student.config():
            return name, ops
    return None


def relate(student: Any, candidates: Mapping[str, Any]) -> tuple[str, list, Any] | None:
    """For :func:`pyro_distill.diagnostics.diagnose_run`: the candidate model folder (``store.ModelFolder``) the
    student was cut from, the operations, and the target its prior row is judged against (the teacher's prior
    restricted to the kept coordinates); None when the student names no surgery or no candidate fits."""
    ops_d = surgery_of(student.card, student.prior)
    if not ops_d:
        return None
    found = find_teacher(ops_d, student.net, {n: m.net for n, m in candidates.items()})
    if not found:
        return None
    tname, ops = found
    return tname, ops, restricted_prior(candidates[tname].net, ops, candidates[tname].prior_or_default())
