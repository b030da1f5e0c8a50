"""Every name prunebench writes to MLflow, in one place: the writers (``run``, ``tune``) and the reader
(``compare``) import them from here. The meaning of each is in docs/tracking.md.
"""

from __future__ import annotations

DEFAULT_URI = "sqlite:///mlflow.db"

# -- tags --------------------------------------------------------------------------------------------
KIND_TAG = "prunebench.kind"  # one of KINDS
RECIPE_TAG = "prunebench.recipe"  # the recipe's name
STAGES_TAG = "prunebench.stage_epochs"  # JSON: stage -> [first step, end step) (end exclusive)
RECIPE_KEY_TAG = "prunebench.recipe_key"  # hash of the resolved recipe (``--resume`` finds its parent by it)
CELL_KEY_TAG = "prunebench.cell_key"  # hash of one cell (a retried cell reopens its run by it)
ERROR_TAG = "prunebench.error"  # "<ExceptionType>: message" of a FAILED run
FAILURE_TAG = "prunebench.failure"  # "diverged", "user-error" or "error"
GIT_DIRTY_TAG = "prunebench.git_dirty"
STUDY_TAG = "prunebench.study"
TRIAL_NUMBER_TAG = "prunebench.trial_number"
TRIAL_STATE_TAG = "prunebench.trial_state"
BEST_PARAMS_TAG = "prunebench.best_params"
ONNX_ERROR_TAG = "prunebench.onnx_error"  # why a cell has no ONNX figures (the model did not export or run)
NOTE_TAG = "mlflow.note.content"  # a run's description in MLflow's UI (Markdown): the parent's comparison table
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # on the experiment: which page MLflow 3's UI opens it on
EXPERIMENT_KIND = "custom_model_development"  # model training (untagged, MLflow 3 opens the GenAI traces page)

PARENT_KIND = "parent"  # one per ``prunebench run`` invocation
CELL_KIND = "cell"  # one (method, seed, target) of the grid, nested under the parent
CONTROL_KIND = "control"  # a seed's dense model trained unpruned through the cells' stages
STUDY_KIND = "study"  # one Optuna study of ``prunebench tune``
TRIAL_KIND = "trial"  # one trial, nested under its study
KINDS = (PARENT_KIND, CELL_KIND, CONTROL_KIND, STUDY_KIND, TRIAL_KIND)

# -- params of a cell (and of a control) ----------------------------------------------------------------
CELL_PARAMS = ("method", "method_label", "seed", "target", "model", "dataset")
METHOD_PARAM_PREFIX = "method."  # method.<name> for each of the method's parameters
WORLD_SIZE_PARAM = "world_size"  # processes training the cell (torchrun's WORLD_SIZE; 1 without it)
GLOBAL_BATCH_PARAM = "global_batch"  # images per optimizer step: data.batch_size x world_size

# -- metrics ----------------------------------------------------------------------------------------------
FINAL_METRICS = (
    "test_top1",
    "val_top1",
    "dense_test_top1",
    "macs",
    "macs_conv_fc",
    "macs_dense",
    "macs_reduction",
    "params",
    "params_reduction",
    "params_dense",
    "latency_ms",
    "latency_ms_batch",
    "speedup",
    "speedup_spread",
)
"""Logged once at the end of every cell (and control), at the cell's last step."""
DENSE_METRICS = (
    "macs_conv_fc_dense",
    "dense_latency_ms",
    "dense_latency_ms_batch",
    "dense_onnx_latency_ms",
    "dense_onnx_latency_ms_batch",
)
"""The dense model's figures, logged with the final metrics (the dense row of ``compare``)."""
LATENCY_METRICS = (
    "speedup_b1",
    "speedup_b1_spread",
    "onnx_latency_ms",
    "onnx_latency_ms_batch",
    "onnx_speedup",
    "onnx_speedup_spread",
)
"""Paired timings of the pruned against the dense model (docs/tracking.md): ``speedup`` and ``onnx_speedup`` at
the latency batch, ``speedup_b1`` at batch 1, each with its spread; the ONNX figures are absent, with
:data:`ONNX_ERROR_TAG` saying why, when the model did not export."""
SPARSITY_METRICS = ("sparsity_zero_frac", "sparsity_pull", "penalty_ratio")
"""The regularizer diagnostics of docs/methods.md, per sparsity epoch and final (regularized methods only)."""
OPTIONAL_METRICS = (*DENSE_METRICS, *LATENCY_METRICS, *SPARSITY_METRICS)
EPOCH_METRICS = ("train_loss", "train_penalty", "train_top1", "val_top1", "lr")
"""Logged every epoch of every stage, ``step`` = the cell's global epoch."""
TRIAL_METRICS = ("val_top1", "objective", "macs", "macs_reduction")
STUDY_METRICS = ("n_trials", "n_complete", "n_pruned", "n_failed", "n_diverged", "best_val_top1")

# -- artifacts --------------------------------------------------------------------------------------------
RECIPE_ARTIFACT = "recipe.yaml"
DATA_ARTIFACT = "data.json"  # the parent run's device and split sizes
LAYERS_ARTIFACT = "layers.csv"
NORMS_ARTIFACT = "sparsity_norms.json"
TRACEBACK_ARTIFACT = "traceback.txt"
TRIALS_ARTIFACT = "trials.csv"
MODEL_ARTIFACT_DIR = "model"
ONNX_ARTIFACT_DIR = "onnx"  # the cell's pruned model exported to ONNX (what onnx_latency_ms timed)
COMPARE_ARTIFACT_DIR = "compare"  # on a parent run: the files of ``prunebench compare --out`` for it


def epoch_metrics(stats: object) -> dict[str, float]:
    """The per-epoch metrics of an :class:`prunebench.train.EpochStats` (with its diagnostics)."""
    values = {name: getattr(stats, name) for name in EPOCH_METRICS}
    return {**values, **getattr(stats, "diagnostics", {})}


# -- ``prunebench tune``: params of a study run and of a trial run, and the study run's artifacts ---------
STUDY_PARAMS = (
    "study",
    "storage",
    "method",
    "method_label",
    "objective",
    "target",
    "seed",
    "trials",
    "sampler",
    "pruner",
    "sparsity_epochs",
    "finetune_epochs",
    "model",
    "dataset",
)
"""Logged once on every study run (with ``method.<name>`` for the fixed parameters, ``space.<name>`` for the
searched ones)."""
TRIAL_PARAMS = ("method", "method_label", "seed", "target", "model", "dataset", "study", "trial")
"""Logged once on every trial run (with ``method.<name>`` for every method parameter, sampled ones included)."""
SPACE_PARAM_PREFIX = "space."  # space.<name>: the range a study searches for the method parameter <name>
BEST_PARAM_PREFIX = "best."  # best.<name>: the best trial's value of <name>, on the study run
PLOTS_ARTIFACT_DIR = "plots"  # Optuna's plots (PNG) of a study run
