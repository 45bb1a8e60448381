"""ArviZ diagnostics of a Gaussian posterior over a network's flat weights, before and after removal.

* :mod:`.idata`: :func:`to_inference_data` turns ``(net, q, X, y)`` into an ``az.InferenceData`` (``posterior``
  per layout block with named dims, ``posterior_predictive``, pointwise ``log_likelihood``, ``observed_data``,
  ``constant_data``, ``sample_stats``: ``lp = log p(w, D)``, ``log_q``); saving and loading ``idata.nc``.
* :mod:`.quality`: the Pareto k-hat of ``log p(w, D) - log q(w)`` over draws of q (Yao et al. 2018: k < 0.5
  good, 0.5-0.7 usable, > 0.7 unreliable); PSIS-LOO, WAIC and ``az.compare`` of several models on the same
  data as one table (:func:`diagnose`, :func:`format_table`, :func:`format_run_table`).
* :mod:`.nuts`: Pyro NUTS on the network's own density as the reference posterior of a small net
  (:func:`nuts_reference`), and how far the SVI Gaussian is from it (:func:`compare_to_reference`).
* :mod:`.runs`: a model folder's InferenceData (:func:`diagnose_model_folder`) and every model of an
  experiment run (:func:`diagnose_run`), models read through :mod:`pyro_distill.store`.

This package imports neither :mod:`pyro_distill.data` nor :mod:`pyro_distill.surgery`: callers pass the data
(``pyro_distill.data.specs.load(card["data"])``) and, for the student-prior rows, the surgery relation
(``pyro_distill.commands.diagnose`` wires both).
"""

from __future__ import annotations

from .idata import (
                    GROUPS,
                    az,
                    block_dims,
                    chain_split,
                    data_fingerprint,
                    idata_from_draws,
                    load_idata,
                    loo_reff,
                    posterior_only_idata,
                    save_idata,
                    to_inference_data,
                    weights_from_idata,
)
from .nuts import LogJointPotential, compare_to_reference, nuts_reference, reference_summary
from .quality import (
                    KhatResult,
                    ModelDiagnosis,
                    diagnose,
                    diagnose_idata,
                    format_run_table,
                    format_table,
                    khat_from_idata,
                    khat_reading,
                    posterior_khat,
)
from .runs import RUN_COLUMNS, diagnose_model_folder, diagnose_run, split_seed, student_prior_idata

__all__ = [
    "to_inference_data",
    "idata_from_draws",
    "weights_from_idata",
    "posterior_only_idata",
    "block_dims",
    "chain_split",
    "loo_reff",
    "save_idata",
    "load_idata",
    "data_fingerprint",
    "diagnose_model_folder",
    "KhatResult",
    "posterior_khat",
    "khat_from_idata",
    "khat_reading",
    "ModelDiagnosis",
    "diagnose_idata",
    "diagnose",
    "format_table",
    "nuts_reference",
    "LogJointPotential",
    "reference_summary",
    "compare_to_reference",
    "student_prior_idata",
    "diagnose_run",
    "split_seed",
    "format_run_table",
    "GROUPS",
    "RUN_COLUMNS",
    "az",
]
