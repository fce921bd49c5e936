"""`sepp pretrain`'s configs: what the user sets (`PretrainConfig`) and what each Ray Train rank
reads (`WorkerConfig`).

Every setting a user can get wrong is checked by `PretrainConfig.validate_settings` before any
data is read or any Ray resource is taken: a bad name found inside a Ray Train worker costs a
cluster start-up and one traceback per rank. The driver then resolves the run (image size,
recipe, data plan, learning rate) into one frozen `WorkerConfig`, so a worker reads typed,
already-checked values and never a string key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sepp_ray.config import opt
from sepp_ray.errors import SeppError
from sepp_ray.train.items import PairsConfig

if TYPE_CHECKING:
    from sepp_ray.data.recipes import TwoViewRecipe
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.optim_defaults import OptimRecipe
    from sepp_ray.train.remine import RemineSpec
    from sepp_ray.train.resident import ResidentPlan


@dataclass
class PretrainConfig:
    dataset: str = opt("", "an image dataset URI (the output of `sepp ingest`)")
    out: str = opt("", "output URI: checkpoints/, tensorboard/, manifest")
    split: str = opt("train", "the split to train on")
    method: str = opt("simclr", "SSL method (see `sepp_ray.methods.list_methods()`)")
    backbone: str = opt("resnet18", "timm model name")
    cifar_stem: bool = opt(True, "3x3 stride-1 first conv, no max-pool (32 px data)")
    image_size: int | None = opt(None, "training resolution (default: the dataset's size)")
    hparams: dict[str, Any] = opt({}, "method hyperparameter overrides, e.g. {temperature: 0.5}")
    recipe: str | None = opt(None, "augmentation recipe (default: the method's own)")
    drop_augment: list[str] = opt(
        [],
        "transforms to remove: crop, flip, jitter, grayscale, "
        "blur, solarize (the transformation ablation)",
    )
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(512, "global batch (items; each yields two views)")
    # optimiser settings: None takes the method's paper recipe (sepp_ray.train.optim_defaults)
    optimizer: str | None = opt(None, "lars, sgd or adamw (default: the method's)")
    base_lr: float | None = opt(None, "learning rate at batch 256, scaled by lr_scaling")
    lr_scaling: str | None = opt(None, "linear, sqrt or none (linear: lr = base_lr x batch / 256)")
    final_lr: float | None = opt(None, "learning rate at the end of the cosine schedule")
    weight_decay: float | None = opt(None, "weight decay (constant unless weight_decay_end)")
    weight_decay_end: float | None = opt(None, "weight decay at the end (a cosine schedule)")
    warmup_epochs: int | None = opt(None, "linear warm-up epochs")
    grad_clip: float | None = opt(None, "global gradient norm clip (0: none)")
    workers: int = opt(1, "Ray Train workers (one GPU each when use_gpu)")
    use_gpu: bool | None = opt(None, "default: when the cluster has GPUs")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per training worker")
    amp: str = opt("auto", "auto (bf16 on GPU), bf16 or off")
    channels_last: bool = opt(True, "channels_last memory format on GPU")
    compile: bool = opt(False, "torch.compile the model")
    sync_bn: bool = opt(False, "synchronised BatchNorm across workers")
    shuffle_buffer: int = opt(4096, "rows mixed in each worker's shuffle buffer (capped at 512 MB)")
    read_ahead: int = opt(
        0, "read-and-decode tasks each worker keeps in flight (0: the node's spare CPUs + 2)"
    )
    decode_cpus: float = opt(1.0, "CPUs of each read-and-decode task")
    data_plane: str = opt(
        "auto",
        "auto: hold the split decoded in device memory when it fits (resident_max_gb, images "
        "of one size), else stream it from Parquet; resident; stream",
    )
    resident_max_gb: float = opt(
        8.0, "the most a resident split may take per rank, decoded, in GiB (auto's threshold)"
    )
    max_item_table_gb: float | None = opt(
        100.0,
        "refuse to build a pair-item table estimated larger, in GiB (pair images x mean image "
        "size: fewer pairs through mining's m or lo, or raise this); null: no bound",
    )
    decode_on: str = opt(
        "cpu",
        "cpu: decode in the read tasks; gpu: ship JPEG bytes and decode them on the training "
        "device (nvJPEG; JPEG shards stored at the training size)",
    )
    budget_steps: int | None = opt(
        None,
        "optimizer steps of the run (equal compute across compared arms: extra pair items "
        "then mean fewer epochs, not more steps); none: epochs x items // batch_size",
    )
    checkpoint_every: int = opt(10, "epochs between checkpoints (the last epoch always)")
    keep_checkpoints: int = opt(
        2, "checkpoints kept: the best by the kNN monitor, and the newest (no monitor: the newest)"
    )
    gpu_wait_s: float | None = opt(
        None,
        "use_gpu with fewer GPUs than workers: ask the autoscaler for them and wait this long "
        "(set it on an autoscaling cluster, e.g. 900); 0: fail at once; none: $SEPP_GPU_WAIT_S "
        "or 0 (sepp_ray.resources)",
    )
    preflight: bool = opt(
        True, "one forward/backward at the local batch before training: a batch too big fails fast"
    )
    preflight_limit_gb: float | None = opt(
        None, "memory the pre-flight step may peak at, in GiB (default: what the device has)"
    )
    max_failures: int = opt(3, "worker failures to recover from (resume from a checkpoint)")
    knn_monitor: bool = opt(True, "kNN accuracy on the validation split during training")
    monitor_split: str = opt(
        "val", "the split the kNN monitor queries (model selection: never the test split)"
    )
    knn_every: int = opt(
        5,
        "epochs between kNN monitor evaluations (and the last); with report_every_steps: "
        "reports between them",
    )
    report_every_steps: int | None = opt(
        None,
        "report metrics every this many optimizer steps (and at the end), whatever an epoch's "
        "length: runs with different items are then compared at the same steps (a sweep sets "
        "it); none: at every epoch's end",
    )
    knn_k: int = opt(200, "neighbours of the kNN monitor")
    knn_max_train: int = opt(10_000, "at most this many train images in the kNN monitor")
    knn_max_test: int = opt(2_000, "at most this many validation images in the kNN monitor")
    seed: int = opt(0, "seed of weights, augmentation and shuffling")
    overwrite: bool = opt(False, "start over, replacing a complete run at `out`")
    pairs: PairsConfig = field(default_factory=PairsConfig)

    def optim_recipe(self) -> OptimRecipe:
        """The method's optimiser recipe with this config's settings applied."""
        from sepp_ray.train.optim_defaults import config_recipe

        return config_recipe(vars(self))

    def validate(self) -> None:
        """Every check of `validate_settings`, and that the dataset and output are given."""
        if not self.dataset or not self.out:
            raise SeppError("pretrain needs DATASET and OUT (see `sepp pretrain --help`)")
        self.validate_settings()

    def validate_settings(self) -> None:
        """Check every setting but the locations (a flow validates its pretraining config
        before the dataset and output it will train on exist): names of the method, backbone,
        recipe and optimiser, hyperparameters, counts and modes. Reads no data, starts no Ray."""
        from sepp_ray.data.recipes import get_recipe
        from sepp_ray.methods import check_pair_use, make_hparams, method_class
        from sepp_ray.models.backbones import check_backbone
        from sepp_ray.resources import gpu_wait
        from sepp_ray.train.step import AMP_MODES, pair_use_of_mode

        make_hparams(self.method, **self.hparams)  # the method's name and hyperparameters
        check_backbone(self.backbone, self.cifar_stem)
        if self.amp not in AMP_MODES:
            raise SeppError(f"amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.data_plane not in ("auto", "resident", "stream"):
            raise SeppError(f"data_plane must be auto, resident or stream, got {self.data_plane!r}")
        if not self.resident_max_gb > 0:
            raise SeppError(f"resident_max_gb must be > 0 GiB, got {self.resident_max_gb}")
        if self.max_item_table_gb is not None and not self.max_item_table_gb > 0:
            raise SeppError(f"max_item_table_gb must be > 0 GiB, got {self.max_item_table_gb}")
        if self.decode_on not in ("cpu", "gpu"):
            raise SeppError(f"decode_on must be cpu or gpu, got {self.decode_on!r}")
        _at_least(self, 1, "epochs", "batch_size", "workers", "checkpoint_every", "knn_every")
        _at_least(self, 0, "read_ahead", "shuffle_buffer", "cpus_per_worker", "decode_cpus")
        if self.knn_monitor:
            _at_least(self, 1, "knn_k", "knn_max_train", "knn_max_test")
        for name in ("image_size", "budget_steps", "report_every_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SeppError(f"{name} must be >= 1 or none, got {value}")
        if self.preflight_limit_gb is not None and not self.preflight_limit_gb > 0:
            raise SeppError(
                f"preflight_limit_gb must be > 0 GiB or none, got {self.preflight_limit_gb}"
            )
        if self.max_failures < -1:
            raise SeppError(
                f"max_failures must be >= 0 (or -1: recover forever), got {self.max_failures}"
            )
        gpu_wait(self.gpu_wait_s)
        if self.batch_size % self.workers:
            raise SeppError(
                f"batch_size {self.batch_size} must divide evenly over {self.workers} workers"
            )
        recipe = self.recipe or method_class(self.method).default_recipe
        get_recipe(recipe, self.image_size or 32, drop=tuple(self.drop_augment))
        self.optim_recipe().peak_lr(self.batch_size)  # names and values checked here
        self.pairs.validate()
        if self.pairs.pairs:  # a mode the method cannot honour fails here, not after training
            check_pair_use(self.method, pair_use_of_mode(self.pairs.mode))
        if self.pairs.remine_every is not None:
            self._validate_remining()

    def _validate_remining(self) -> None:
        """Re-mining needs a round to happen and, for ``remine_encoder=momentum``, a method
        with a momentum encoder."""
        from sepp_ray.methods import method_class

        every = self.pairs.remine_every
        assert every is not None
        if self.budget_steps is None and every >= self.epochs:
            raise SeppError(
                f"pairs.remine_every={every} with epochs={self.epochs}: no round would re-mine; "
                "lower remine_every or train longer"
            )
        if self.pairs.remine_encoder == "momentum" and not method_class(self.method).momentum_attr:
            raise SeppError(
                f"pairs.remine_encoder=momentum: method {self.method} has no momentum encoder "
                "(moco, byol and dino do); use auto or online"
            )


def _at_least(cfg: object, low: float, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < low:
            raise SeppError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class WorkerConfig:
    """What every Ray Train rank reads: the run resolved by the driver (the one object its
    `TorchTrainer` calls the train loop with), so no rank re-derives or re-checks a setting.

    hparams: the method's hyperparameters fitted to the plain run's items (`fit_hparams`). recipe:
    the augmentation recipe at ``image_size`` with the ablation's drops applied. pair_use: what
    a batch's ``pos_ids`` are to the loss (`pair_use_of_mode`). optim, lr, warmup_steps: the
    optimiser recipe, its peak rate at the global batch and the warm-up's optimizer steps.
    reference_steps_per_epoch: the plain run's epoch in steps, the unit of a method's
    epoch-counted schedules (`sepp_ray.train.schedule`). report_every_steps: report every this
    many optimizer steps and at the end (None: at each epoch's end).
    data: the data plan (epochs, steps, local batch, chunks). monitor: the kNN monitor's sample
    references (`read_slice` ObjectRefs) with its split, or None. num_classes: of the dataset.
    """

    # the model
    method: str
    backbone: str
    cifar_stem: bool
    hparams: dict[str, Any]
    image_size: int
    recipe: TwoViewRecipe
    seed: int
    sync_bn: bool
    channels_last: bool
    compile: bool
    # the step and its schedule
    amp: str
    pair_use: str
    optim: OptimRecipe
    lr: float
    warmup_steps: int
    data: DataPlan | ResidentPlan
    workers: int
    preflight: bool
    preflight_limit_gb: float | None
    # what rank 0 writes and monitors
    dataset: str
    split: str
    out: str
    checkpoint_every: int
    keep_checkpoints: int
    monitor: dict[str, Any] | None
    knn_every: int
    knn_k: int
    num_classes: int
    # the schedule's epoch (the plain run's; 0: the data epoch) and the reporting interval
    reference_steps_per_epoch: int = 0
    report_every_steps: int | None = None
    # re-mining rounds (None: the pairs are mined once)
    remine: RemineSpec | None = None

    def __post_init__(self) -> None:
        """The run's invariants: a violation is a driver bug, caught before any worker starts."""
        from sepp_ray.methods.base import PAIR_USES
        from sepp_ray.train.step import AMP_MODES

        if self.amp not in AMP_MODES:
            raise SeppError(f"amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.pair_use not in PAIR_USES:
            raise SeppError(f"pair_use must be one of {list(PAIR_USES)}, got {self.pair_use!r}")
        _at_least(self, 1, "image_size", "workers", "checkpoint_every", "knn_every", "num_classes")
        _at_least(self, 0, "reference_steps_per_epoch")
        if self.report_every_steps is not None and self.report_every_steps < 1:
            raise SeppError(
                f"report_every_steps must be >= 1 or none, got {self.report_every_steps}"
            )
        if not self.lr > 0:
            raise SeppError(f"the peak learning rate must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < self.data.total_steps:
            raise SeppError(
                f"warmup_steps {self.warmup_steps} must be in [0, {self.data.total_steps}) "
                "(the run's optimizer steps): lower warmup_epochs"
            )
        if self.data.global_batch % self.workers:
            raise SeppError(
                f"batch_size {self.data.global_batch} must divide evenly over {self.workers} "
                "workers"
            )
