"""Default configuration: MSF on ImageNet 256x256 SD-VAE latents (32x32x4), base + residual DiTs.

Every setting that is our design rather than a published number is a field here so it can be
ablated. Derived configs (`demo.py`, `dit_xl2.py`, ...) start from `get_config()` and change fields.
Override on the command line: `--config=configs/default.py --config.train.batch_size=64`.
"""

import ml_collections

from msf_jax.runtime import axes  # plain names: parsing a config imports neither JAX nor Flax


def stage_config(model_name: str, *, process: str = "gaussian", sampler: str = "ddpm",
                 num_sampling_steps: int = 250, guidance_scale: float = 1.5) -> ml_collections.ConfigDict:
    """One diffusion stage: its DiT, its noising process and how it is sampled."""
    # The DiT fields default to DiT.__init__'s keyword defaults (msf_jax/models/dit.py), written out
    # here so that a config parses without importing Flax; tests/test_dit.py checks that they agree.
    return ml_collections.ConfigDict(dict(
        model=dict(
            name=model_name,  # a key of msf_jax.models.dit.DIT_CONFIGS, e.g. "DiT-XL/2"
            # Overrides of the registry entry; 0 keeps the registry value.
            depth=0, hidden_size=0, num_heads=0, patch_size=0,
            mlp_ratio=4.0,
            class_dropout_prob=0.1,  # 0 = no null class (no guidance)
            learn_sigma=True,
            # Fast paths (same function up to rounding; see msf_jax/models/attention.py and dit.py):
            attention="auto",  # "auto" | "einsum" | "xla" | "cudnn" (GPU) | "splash" (TPU)
            # with train.remat: "nothing_saveable" | "dots_saveable" | "dots_with_no_batch_dims_saveable"
            remat_policy="nothing_saveable",
            stream_dtype="",  # residual stream: "" = train.compute_dtype | "float32" (bf16 compute)
        ),
        process=process,  # "gaussian" (DiT protocol: eps + learned sigma, MSE+VLB) | "flow"
        num_train_timesteps=1000,
        flow_t_sampling="uniform",  # flow: "uniform" | "logit_normal" training times
        flow_logit_mean=0.0,
        flow_logit_std=1.0,
        # gaussian: "ddpm" | "ddim"; flow: "euler" | "heun" | "dpm2m" (DPM-Solver++(2M), one call per
        # step) | "sde" (SiT's Euler-Maruyama, w(t) = 2t)
        sampler=sampler,
        # heun: "euler" ends with an Euler step (no model call at t = 0, EDM's choice; measured far
        # better on real images, README "Sampler defaults"); "heun" corrects the last interval too.
        heun_final_step="euler",
        num_sampling_steps=num_sampling_steps,
        # flow: the time grid t' = s t / (1 + (s - 1) t) of uniform t (SD3's shift); > 1 more steps near
        # noise, < 1 more near data, 1 = uniform
        sampling_time_shift=1.0,
        ddim_eta=0.0,
        guidance_scale=guidance_scale,  # 1.0 disables classifier-free guidance
        guidance_channels=0,  # guide only the first k output channels (DiT: 3); 0 = all
        # Guide only at noise levels in [lo, hi] (fractions: flow t, Gaussian t / T; 1 = pure noise);
        # (0, 1) guides at every step. The guided batch is doubled at every step either way.
        guidance_interval=(0.0, 1.0),
    ))


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Which model this run trains: "dit" (single-stage baseline) | "base" | "residual" (MSF stages) |
    # "residual_<k>" (level k of a pyramid, factorizer.levels >= k; residual_1 == residual).
    config.stage = "base"

    config.data = ml_collections.ConfigDict(dict(
        source="tfds",  # "tfds" | "folder" | "latent_cache" | "synthetic"
        tfds_name="imagenet2012",
        tfds_data_dir="",  # where the manually downloaded imagenet2012 lives ("" = tfds default)
        folder="",  # image folder with one subfolder per class
        cache_dir="",  # latent cache written by --mode=extract_latents
        image_size=256,
        num_classes=1000,
        random_flip=True,
        num_workers=4,  # grain worker processes per host (0 = in-process); batches do not depend on it
        read_threads=8,
        min_image_side=0,  # images with a smaller side are skipped and counted (0 = image_size // 4)
        train_split="train",
        eval_split="train",  # real images for reference statistics (ADM's references use train)
        tfds_image_key="image",
        tfds_label_key="label",
        tfds_manual_dir="",  # where imagenet2012's tar files are ("" = <data_dir>/downloads/manual)
        tfds_prepare=False,  # build the tfds dataset (array_record) here if it is not prepared
        synthetic_size=1 << 20,  # number of distinct training images of the synthetic set
        synthetic_seed=0,  # decides the synthetic images themselves (config.seed orders and flips them)
        # Latent cache (--mode=extract_latents writes it, source="latent_cache" reads it).
        cache_source="",  # what extract_latents encodes: "tfds" | "folder" ("" = folder if set, else tfds)
        cache_shard_size=1024,  # examples per ArrayRecord shard
        cache_batch_size=128,  # images per host per VAE call (their flips are encoded alongside)
        cache_stats_examples=0,  # cached examples the factorizer statistics are measured on (0 = all)
    ))
    # "latent": SD-VAE latents (image_size / 8, 4 channels); "pixel": the factorizer applies to pixels.
    config.space = "latent"
    config.vae = ml_collections.ConfigDict(dict(
        weights="",  # converted SD-VAE weights (python -m msf_jax.convert vae ...)
        scaling_factor=0.18215,
        dtype="float32",
        decode_batch_size=32,
    ))

    config.factorizer = ml_collections.ConfigDict(dict(
        mode="laplacian",  # "laplacian" (residual at full resolution) | "haar" (3 detail bands at H/f)
        factor=2,
        levels=1,  # >1: a Laplacian pyramid, one residual per level
        upsample="nearest",  # "nearest" | "bilinear" (laplacian mode)
        standardize=True,  # per-channel standardization of each component with dataset statistics
        stats_path="",  # JSON written by the latent cache / stats pass ("" = measure at start-up)
        stats_batches=50,  # batches measured when stats_path is empty
    ))

    config.base = stage_config("DiT-XL/2", num_sampling_steps=250, guidance_scale=1.5)
    # Every residual level of a pyramid uses config.residual, unless a derived config file defines
    # config.residual_<k> = stage_config(...) for level k >= 2 (msf_jax.stages).
    config.residual = stage_config("DiT-B/2", num_sampling_steps=50, guidance_scale=1.5)
    config.dit = stage_config("DiT-XL/2", num_sampling_steps=250, guidance_scale=1.5)
    # Noise-conditioning augmentation of the residual stage's conditioning base (cascaded diffusion):
    # during training the true base is noised to a random level in [0, max] (as a fraction of the
    # 1000-step schedule), embedded like the timestep; at sampling time `sample_level` is used.
    config.residual_cond = ml_collections.ConfigDict(dict(
        noise_augment=True,
        max_level=0.2,
        sample_level=0.0,
    ))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=256,  # global batch
        num_steps=400_000,
        learning_rate=1e-4,
        warmup_steps=0,
        lr_schedule="constant",  # after warmup: "constant" (DiT) | "cosine" | "linear" (decay to 0 at num_steps)
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        grad_clip=0.0,  # global-norm clipping; 0 disables
        ema_decay=0.9999,
        # Bias-corrected EMA (msf_jax/train_step.py, ema_step_decay): the EMA is the decay-weighted
        # average of the weights seen, with no share of the initialization left (without it, 0.999
        # after 2,500 steps is still 8% initial weights). Identical to plain at DiT's 400K steps.
        ema_debias=True,
        # Start from pretrained weights (fresh starts only; a resumed run ignores it): a converted DiT
        # (`python -m msf_jax.convert dit ... out.safetensors`) or another workdir (its EMA weights),
        # any stage from any stage. Grid, conditioning channels, labels and learned sigma are adapted
        # (msf_jax/jobs/init_from.py); width/depth/heads/patch must match. "" = random init.
        init_from="",
        compute_dtype="float32",  # "bfloat16" for bf16 compute with fp32 params
        remat=False,
        log_every=100,
        checkpoint_every=5000,
        keep_checkpoints=3,
        sample_every=20_000,  # EMA sample grid; 0 disables
        sample_grid_size=16,
        eval_every=0,  # in-training FID / SWD (config.eval.metric) every K steps; 0 disables
        eval_num_samples=2000,  # EMA samples scored at each in-training eval
        profile=False,  # a jax.profiler trace into the workdir (TensorBoard's profile tab)
        profile_first=10,  # steps after the (re)start at which the trace begins (past compilation)
        profile_steps=5,  # steps traced
    ))

    config.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1),  # (data, fsdp, tensor); -1 = the remaining devices
        num_slices=1,  # multi-slice TPU: the data axis spans slices
        # Logical parameter axis -> mesh axis (None = replicated, or a tuple of mesh axes), e.g.
        # --config.mesh.rules="(('embed', None), ('mlp', 'tensor'), ...)" to turn FSDP off.
        rules=axes.DEFAULT_RULES,
    ))

    config.sample = ml_collections.ConfigDict(dict(
        num_samples=50_000,
        batch_size=64,  # global batch per sampling step
        labels="balanced",  # "balanced" (N / num_classes per class) | "random"
        outputs="npz,tfrecord,grid",
        shard_size=1000,  # samples per TFRecord shard
        base_checkpoint="",  # workdir or converted-weights file of the base stage
        residual_checkpoint="",  # a pyramid: one per level, comma-separated, coarse to fine
        dit_checkpoint="",
        use_ema=True,
    ))

    config.eval = ml_collections.ConfigDict(dict(
        metric="fid",  # "fid" | "swd"
        inception_weights="",  # converted pytorch-fid Inception weights
        reference="",  # ADM reference .npz, our saved stats .npz, or "" for the training set
        samples="",  # .npz of samples to evaluate (sample's output by default)
        num_samples=50_000,
        batch_size=200,
        precision_recall=False,
    ))

    # --mode=sweep: a grid of sampling settings, each scored (eval.metric) and costed. Lists are
    # comma-separated ("6,12,24"); "" means the stage's own value above. Checkpoints: config.sample.
    config.sweep = ml_collections.ConfigDict(dict(
        num_samples=1000,  # the same indices 0..N-1 (labels, noise) for every setting
        base_sampler="",
        base_steps="",
        base_guidance="",
        residual_sampler="",
        residual_steps="",
        residual_guidance="",
        tie_guidance=False,  # True: residual guidance = base guidance in each setting (residual_guidance unused)
        sample_level="",  # the residual stage's conditioning-noise level(s) (residual_cond.sample_level)
        dit_sampler="",  # single-stage DiT settings (when sample.dit_checkpoint is given)
        dit_steps="",
        dit_guidance="",
        plot_title="",
    ))

    # How the process runs, not what it computes (not part of the model signature).
    config.runtime = ml_collections.ConfigDict(dict(
        # XLA / libtpu flags set before the backend starts (msf_jax/xla_flags.py, from maxtext and
        # maxdiffusion): "" | "tpu_v5e" | "tpu_v5p" | "tpu_v6e" | "gpu". Appended to LIBTPU_INIT_ARGS /
        # XLA_FLAGS; a flag you set there yourself wins. The launchers' --xla-preset sets this.
        xla_flags_preset="",
        # Multi-host: a host silent this long (died, lost its VM, hangs) counts as lost; the others then
        # exit with one line naming it and status 42 (rerun: training resumes from its last checkpoint).
        heartbeat_timeout_s=100.0,
    ))
    return config
