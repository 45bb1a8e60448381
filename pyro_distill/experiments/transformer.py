"""Experiment kind ``transformer``: remove heads, an attention sublayer or a block of a transformer teacher by
conditioning its posterior, then compare the student trained under that prior with the usual baselines.

Per seed: a teacher (pre-LN transformer, low-rank Gaussian posterior by MAP then SVI) on digits read as 8
rows of 8 pixels; for every student architecture a surgery plan (evidence selector by default) gives
the conditioned prior; the same student is then trained by

* ``vi_conditioned``  VI under the conditioned teacher posterior (started at its mean);
* ``vi_standard``     VI under the student's fan-in prior, random start;
* ``deterministic``   MAP (cross-entropy + the fan-in prior's weight decay);
* ``kd``              Hinton KD from the teacher's posterior predictive (:func:`pyro_distill.baselines.kd_loss`);
* ``tinybert``        feature-level KD in the style of TinyBERT: cross-entropy plus the MSE between the student's
  and the teacher's (posterior-mean) hidden states after every kept block and head-averaged attention maps
  (the student may have fewer heads, so maps are averaged over heads before matching);

and ``conditioned_prior`` evaluates the conditioned prior itself, untrained. Every method gets the same
number of optimizer steps (``map_steps + steps``). Issue 13 adds ``vi_conditioned_evidence`` (as
``vi_conditioned``, the prior's covariance times ``tau`` chosen by the student's Laplace evidence on its own
training data, :func:`~pyro_distill.distill.evidence_temperature`; ``tau_chosen`` in the row) and
``reduced_posterior`` (Bayesian model reduction: ``map_steps + steps`` SVI steps from the conditioned teacher
posterior under the student's own fan-in prior; ``log_evidence_change`` in the row), and ``student.fractions``
(default ``[1.0]``): the students train on a seeded, stratified fraction of the training split (setting
``"<student> frac=<f>"`` below 1), the teacher on all of it. Figures: :func:`make_figures`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .. import metrics
from ..baselines import deterministic, knowledge_distillation, standard_prior
from ..data.token_tasks import digits_sequences, match_task
from ..distill import evidence_temperature, reduced_posterior
from ..inference import fit_posterior
from ..nets.transformer import Transformer
from ..surgery import apply
from ..surgery.transformer import RemoveBlock, plan_transformer
from .core import SeedContext, register_kind

__all__ = ["run_seed", "DEFAULTS", "tinybert", "make_figures"]

METHODS = ("conditioned_prior", "vi_conditioned", "vi_standard", "deterministic", "kd", "tinybert",
           "vi_conditioned_evidence", "reduced_posterior")

DEFAULTS: dict[str, Any] = {
    "task": "digits",           # "digits" (8 rows x 8 pixels) or "match" (marked-token matching)
    "pad_fraction": 0.0,        # digits: fraction of images with hidden last rows (padding)
    "n_train": 2000,            # match task sizes
    "n_test": 2000,
    "net": {"d_model": 16, "heads": [4, 4], "ffn": [True, True], "d_head": 4, "d_ff": 32, "pooling": "mean"},
    # student name -> {"heads": [...], "ffn": [...]}
    "students": {},
    "selector": "evidence",
    "methods": list(METHODS[:6]),
    "guide": "lowrank",
    "rank": 10,
    "batch_size": 128,
    "num_particles": 4,
    "teacher": {"map_steps": 1000, "steps": 400, "lr": 5e-3, "map_lr": 1e-2},
    "student": {"map_steps": 600, "steps": 400, "lr": 5e-3, "map_lr": 1e-2, "fractions": [1.0]},
    "kd": {"gamma": 0.5, "temperature": 2.0},
    "tinybert": {"beta_hidden": 1.0, "beta_attn": 1.0},
    "eval_samples": 100,
    "curve_points": 5,
    "save_models": False,
    "idata_draws": 200,             # draws in each saved model's ArviZ idata.nc (0: none)
}


def _data(cfg: dict[str, Any], seed: int):
    if cfg["task"] == "digits":
        d = digits_sequences(seed=seed, pad_fraction=cfg["pad_fraction"])
        return d, {"input_dim": 8, "n_classes": 10, "max_len": 8, "embedding": "patch"}
    if cfg["task"] == "match":
        d = match_task(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=seed)
        return d, {"input_dim": 8, "n_classes": 2, "max_len": d.X.shape[1], "embedding": "token"}
    raise ValueError(f"unknown task {cfg['task']!r}; use 'digits' or 'match'")


def tinybert(student: Transformer, X: torch.Tensor, y: torch.Tensor, teacher_feats: dict[str, Any],
             block_map: list[int], steps: int, lr: float, beta_hidden: float = 1.0, beta_attn: float = 1.0,
             batch_size: int | None = None, seed: int = 0, callback=None, eval_every: int = 0) -> torch.Tensor:
    """A point student trained on ``CE + beta_h * sum_l MSE(h_l^S, h_{m(l)}^T) + beta_a * sum_l MSE(A_l^S, A_{m(l)}^T)``
    plus the fan-in prior's ``-log p(w) / N``; ``m`` maps student block ``l`` to its teacher block (embedding
    output to embedding output), ``A`` are attention maps averaged over heads, compared on valid query/key
    positions only. TinyBERT (Jiao et al. 2020) matches per head; averaging lets fewer heads be matched."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prior = student.default_prior(X.dtype)
    w = student.init_weights(gen, X.dtype).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    N = X.shape[0]
    hid_t = teacher_feats["hidden"]
    att_t = teacher_feats["attn"]
    for step in range(steps):
        idx = torch.randint(0, N, (batch_size,), generator=gen) if batch_size and batch_size < N else torch.arange(N)
        f = student.features(w, X[idx])
        m = f["mask"].to(X.dtype)  # [B, T]
        loss = torch.nn.functional.cross_entropy(f["logits"], y[idx])
        pairs = [(0, 0)] + [(s + 1, t + 1) for s, t in enumerate(block_map)]
        for s, t in pairs:
            d2 = ((f["hidden"][s] - hid_t[t][idx]) ** 2).mean(-1)
            loss = loss + beta_hidden * (d2 * m).sum() / m.sum()
        for s, t in enumerate(block_map):
            if f["attn"][s] is None or att_t[t] is None:
                continue
            mm = m[:, :, None] * m[:, None, :]
            d2 = (f["attn"][s].mean(-3) - att_t[t][idx]) ** 2
            loss = loss + beta_attn * (d2 * mm).sum() / m.sum()
        loss = loss - prior.log_prob(w) / N
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None and eval_every and (step + 1) % eval_every == 0:
            callback(step + 1, w.detach())
    return w.detach()


def _stratified(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded, per-class ``fraction`` of the rows (at least one per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"student.fractions must lie in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    parts = []
    for c in torch.unique(y):
        members = (y == c).nonzero().reshape(-1)
        k = max(1, round(fraction * members.numel()))
        parts.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.cat(parts).sort().values


def _teacher_block_map(plan) -> list[int]:
    """Which teacher block each student block came from (block removals renumber the later ones)."""
    blocks = list(range(len(plan.teacher["heads"])))
    for op in plan:
        if isinstance(op, RemoveBlock):
            blocks.pop(op.block)
    return blocks


def run_seed(cfg: dict[str, Any], seed: int, ctx: SeedContext) -> None:
    torch.manual_seed(seed)
    d, shape = _data(cfg, seed)
    X, y, Xte, yte = d.X, d.y, d.Xte, d.yte
    net_cfg = dict(cfg["net"])
    teacher = Transformer(**shape, **net_cfg)
    fit_kw = {"guide": cfg["guide"], "rank": cfg["rank"], "batch_size": cfg["batch_size"],
              "num_particles": cfg["num_particles"], "cov_init": "prior", "elbo_eval_particles": 8}
    S = cfg["eval_samples"]
    npts = max(1, cfg["curve_points"])

    def ev(net, q, setting, method, extra=None):
        r = metrics.evaluate(net, q, Xte, yte, num_samples=S, seed=seed, teacher_probs=tp_test)
        ctx.record({"setting": setting, "method": method} | r | (extra or {}))
        ctx.log(f"{setting:>12s} {method:>18s}: acc {r['accuracy']:.3f} nll {r['nll']:.3f} p={r['params']}")

    def curve_cb(net, setting, method, offset=0):
        def cb(step, q):
            w = q.mean if hasattr(q, "mean") and not isinstance(q, torch.Tensor) else q
            with torch.no_grad():
                acc = float((net(w, Xte).argmax(-1) == yte).double().mean())
            ctx.curve(setting, method, step + offset, "test_accuracy_at_mean", acc)
        return cb

    # ---- teacher
    tc = cfg["teacher"]
    every = max(1, (tc["map_steps"] + tc["steps"]) // npts)
    q_t, hist = fit_posterior(teacher, X, y, prior=None, steps=tc["steps"], lr=tc["lr"], map_steps=tc["map_steps"],
                              map_lr=tc["map_lr"], seed=seed, callback=curve_cb(teacher, "teacher", "vi"),
                              eval_every=every, **fit_kw)
    tp_test = metrics.predict(teacher, q_t, Xte, num_samples=S, seed=seed)
    tp_train = metrics.predict(teacher, q_t, X, num_samples=S, seed=seed)
    r = metrics.evaluate(teacher, q_t, Xte, yte, num_samples=S, seed=seed)
    ctx.record({"setting": "teacher", "method": "vi"} | r | {"fit_s": hist.map_time_s + hist.svi_time_s})
    ctx.log(f"teacher {teacher!r}: acc {r['accuracy']:.3f} nll {r['nll']:.3f}")
    if cfg["save_models"]:
        ctx.save_model("transformer-teacher", teacher, q_t, {"task": cfg["task"]}, data=(X, y),
                       idata_draws=cfg["idata_draws"])
    with torch.no_grad():
        tfeat = teacher.features(q_t.mean.to(X.dtype), X)
    tfeat["attn"] = [None if a is None else a.mean(-3) for a in tfeat["attn"]]

    sc = cfg["student"]
    budget = sc["map_steps"] + sc["steps"]
    every = max(1, budget // npts)
    for name, arch in cfg["students"].items():
        student = teacher.replace(heads=list(arch["heads"]), ffn=list(arch.get("ffn", [True] * len(arch["heads"]))))
        plan = plan_transformer(teacher, student, selector=cfg["selector"], posterior=q_t, seed=seed)
        ctx.log(f"{name}: {plan}".replace("\n", " "))
        _, prior = apply(plan, teacher, q_t)
        prior = prior.to(dtype=X.dtype)
        methods = cfg["methods"]
        for frac in sc["fractions"]:
            # the students' training data: a seeded stratified fraction of the teacher's (1: the same data)
            idx = None if frac == 1 else _stratified(y, frac, seed)
            Xs, ys = (X, y) if idx is None else (X[idx], y[idx])
            tp_sub = tp_train if idx is None else tp_train[idx]
            tf_sub = tfeat if idx is None else {
                "hidden": [h[idx] for h in tfeat["hidden"]],
                "attn": [None if a is None else a[idx] for a in tfeat["attn"]]}
            sname = name if frac == 1 else f"{name} frac={frac:g}"
            fx = {"fraction": float(frac), "n_train": len(Xs)}
            extra = {"plan": [repr(op) for op in plan]} | fx
            if "conditioned_prior" in methods:
                ev(student, prior.loc, sname, "conditioned_prior", extra)
            if "vi_conditioned" in methods:
                q, _ = fit_posterior(student, Xs, ys, prior=prior, init="prior", steps=sc["steps"], lr=sc["lr"],
                                     map_steps=sc["map_steps"], map_lr=sc["map_lr"], seed=seed,
                                     callback=curve_cb(student, sname, "vi_conditioned"), eval_every=every, **fit_kw)
                ev(student, q, sname, "vi_conditioned", extra | {"kl_to_prior": float(q.kl(prior))})
                if cfg["save_models"]:
                    ctx.save_model(f"transformer-{sname.replace(' ', '-')}", student, q, {"plan": plan.to_dict()},
                                   data=(Xs, ys), prior=prior, idata_draws=cfg["idata_draws"])
            if "vi_conditioned_evidence" in methods:  # issue 13: tau chosen by the student's evidence on (Xs, ys)
                tau, info = evidence_temperature(student, prior, Xs, ys, map_steps=sc["map_steps"],
                                                 map_lr=sc["map_lr"], seed=seed, batch_size=cfg["batch_size"])
                pt = prior.tempered(tau) if tau != 1 else prior
                q, _ = fit_posterior(student, Xs, ys, prior=pt, init="prior", steps=sc["steps"], lr=sc["lr"],
                                     map_steps=sc["map_steps"], map_lr=sc["map_lr"], seed=seed,
                                     callback=curve_cb(student, sname, "vi_conditioned_evidence"), eval_every=every,
                                     **fit_kw)
                ev(student, q, sname, "vi_conditioned_evidence",
                   extra | {"kl_to_prior": float(q.kl(pt)), "tau_chosen": tau, "log_evidence": info["log_evidence"],
                            "log_evidence_tau1": info["log_evidence_tau1"], "tau_at_bound": int(info["at_bound"]),
                            "evidence_structure": info["structure"]})
            if "reduced_posterior" in methods:  # issue 13: conditioned posterior as the start, own fan-in prior
                red = reduced_posterior(teacher, q_t, student, Xs, ys, ops=plan, guide=cfg["guide"],
                                        steps=budget, lr=sc["lr"], seed=seed,
                                        callback=curve_cb(student, sname, "reduced_posterior"), eval_every=every,
                                        **{k: v for k, v in fit_kw.items() if k not in ("guide", "cov_init")})
                ev(student, red.posterior, sname, "reduced_posterior",
                   extra | {"log_evidence_change": red.info["log_evidence_change"]})
            if "vi_standard" in methods:
                q, _ = standard_prior(student, Xs, ys, steps=sc["steps"], lr=sc["lr"], map_steps=sc["map_steps"],
                                      map_lr=sc["map_lr"], seed=seed, callback=curve_cb(student, sname, "vi_standard"),
                                      eval_every=every, **fit_kw)
                ev(student, q, sname, "vi_standard", fx)
            if "deterministic" in methods:
                w, _ = deterministic(student, Xs, ys, steps=budget, lr=sc["map_lr"], seed=seed,
                                     batch_size=cfg["batch_size"], callback=curve_cb(student, sname, "deterministic"),
                                     eval_every=every)
                ev(student, w, sname, "deterministic", fx)
            if "kd" in methods:
                w, _ = knowledge_distillation(student, Xs, ys, tp_sub, gamma=cfg["kd"]["gamma"],
                                              temperature=cfg["kd"]["temperature"], steps=budget, lr=sc["map_lr"],
                                              seed=seed, batch_size=cfg["batch_size"],
                                              callback=curve_cb(student, sname, "kd"), eval_every=every)
                ev(student, w, sname, "kd", fx)
            if "tinybert" in methods:
                w = tinybert(student, Xs, ys, tf_sub, _teacher_block_map(plan), steps=budget, lr=sc["map_lr"],
                             beta_hidden=cfg["tinybert"]["beta_hidden"], beta_attn=cfg["tinybert"]["beta_attn"],
                             batch_size=cfg["batch_size"], seed=seed, callback=curve_cb(student, sname, "tinybert"),
                             eval_every=every)
                ev(student, w, sname, "tinybert", fx)


register_kind("transformer", DEFAULTS, run_seed)


# ============================================================================ figures
def _rows(run_dirs: list[Path], name: str) -> list[dict[str, Any]]:
    from .core import read_rows

    rows = []
    for d in run_dirs:
        rows += read_rows(d / name) if (d / name).exists() else []
    return rows


def summary_table(run_dirs: str | Path | list[str | Path]) -> str:
    """The markdown table (mean ± sd over seeds) of one run, or of several runs of the same config that
    ran disjoint seeds (e.g. seeds split over two invocations), through the runner's own summary code."""
    from .core import summarize, summary_markdown

    dirs = [Path(d) for d in (run_dirs if isinstance(run_dirs, list) else [run_dirs])]
    rows = _rows(dirs, "metrics.csv")
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) != sum(len({r["seed"] for r in _rows([d], "metrics.csv")}) for d in dirs):
        raise ValueError(f"runs {dirs} share seeds; combine only runs with disjoint seeds")
    return summary_markdown(summarize(rows), seeds=len(seeds),
                            metrics=["accuracy", "nll", "ece", "brier", "agreement", "params"])


def make_figures(run_dir: str | Path | list[str | Path], out: str | Path = "figures",
                 prefix: str = "transformer") -> list[Path]:
    """``{prefix}_metrics.png`` (test accuracy and NLL, mean ± sd over seeds, per student x method) and
    ``{prefix}_curves.png`` (test accuracy at the posterior mean / point estimate vs step) from a run
    (or several runs with disjoint seeds)."""
    from ..plots import style

    dirs = [Path(d) for d in (run_dir if isinstance(run_dir, list) else [run_dir])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(dirs, "metrics.csv")
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if s != "teacher"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    teacher = [r for r in rows if r["setting"] == "teacher"]
    made = []
    # points with ± sd bars, not bars: accuracies of 0.74-0.96 drawn as bars from an arbitrary baseline
    # would exaggerate (or, from 0, hide) the differences; the y range follows the data
    fig, axes = style.subplots(1, 2, panel=(4.6, 3.2), extra_width=2.4)
    for ax, metric in zip(axes[0], ("accuracy", "nll")):
        series = {}
        for m in methods:
            means, sds = [], []
            for s in settings:
                v = [r[metric] for r in rows if r["setting"] == s and r["method"] == m]
                means.append(sum(v) / len(v) if v else float("nan"))
                sds.append(_sd(v))
            series[style.display_name(m)] = (means, sds)
        ends = style.dot_groups(ax, settings, series,
                                {style.display_name(m): style.method_color(m) for m in methods})
        if teacher:
            tv = [r[metric] for r in teacher]
            ax.axhline(sum(tv) / len(tv), color="k", ls="--", lw=1, label="Teacher")
            ends.append(sum(tv) / len(tv))
        ax.set_ylabel(f"test {metric}")
        style.fit_ylim(ax, ends, lo=0.0, hi=1.0 if metric == "accuracy" else None)
    style.legend_outside(fig, axes)
    fig.suptitle(f"transformer head/sublayer/block removal ({len({r['seed'] for r in rows})} seeds, mean ± sd)")
    made.append(style.save(fig, out / f"{prefix}_metrics.png"))

    curves = _rows(dirs, "curves.csv")
    if curves:
        fig, axes = style.subplots(1, len(settings), panel=(3.6, 3.0), extra_width=2.4, sharey=True)
        for ax, s in zip(axes[0], settings):
            for m in methods:
                pts = [c for c in curves if c["setting"] == s and c["method"] == m]
                steps = sorted({c["step"] for c in pts})
                if not steps:
                    continue
                mean = [sum(c["value"] for c in pts if c["step"] == t) / sum(1 for c in pts if c["step"] == t)
                        for t in steps]
                ax.plot(steps, mean, marker=".", label=style.display_name(m), color=style.method_color(m))
            ax.set_title(s)
            ax.set_xlabel("optimizer step")
            sm = cfg_map_steps(dirs[0])
            style.mark_switch(ax, sm)
        axes[0][0].set_ylabel("test accuracy (mean weights)")
        style.legend_outside(fig, axes)
        made.append(style.save(fig, out / f"{prefix}_curves.png"))
    return made


def cfg_map_steps(run_dir: Path) -> int | None:
    """The students' MAP steps (where VI switches to SVI) from a run's config.json."""
    from ..plots.experiments import map_steps_of

    return map_steps_of(run_dir)


def _sd(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


if __name__ == "__main__":  # python -m pyro_distill.experiments.transformer OUT RUN_DIR [RUN_DIR ...]
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python -m pyro_distill.experiments.transformer OUT_DIR RUN_DIR [RUN_DIR ...]")
    for path in make_figures(sys.argv[2:], sys.argv[1]):
        print(path)
    print(summary_table(sys.argv[2:]))
