"""Defaults shared by every experiment config; each config file starts from ``base.get_config()``."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.seed = 0
  c.replicates = 2  # seeds; ignored when cv_folds > 0
  c.cv_folds = 0  # K > 0: replicate r trains on all folds but r and also reports accuracy on fold r
  c.strategies = ("dense",)
  none = lambda t: ml_collections.FieldReference(None, field_type=t)
  c.dataset = ml_collections.ConfigDict(dict(
      name="digits", data_dir=none(str), download=False, manual_dir=none(str),
      num_train=none(int), num_test=none(int),
      # TFDS datasets outside the catalog defaults: feature keys and splits.
      x_key=none(str), text_keys=none(tuple), label_key=none(str), train_split=none(str),
      test_split=none(str), image_size=none(int),
      tokenizer="bpe", tokenizer_dir=none(str), vocab_size=8192, max_len=64,
      # images: on-device crop (after zero padding) + flip, and standardization after scaling.
      augment=False, crop_padding=4, mean=none(tuple), std=none(tuple),
      num_threads=none(int),  # loader reader threads (default: 0 in memory, 8 on disk)
      label_noise=0.0,  # fraction of training labels flipped (seeded), for noise experiments
      cache_dir=none(str),
      # The training split on the device (the fused path): "auto" when it fits device_budget_mb
      # (0: a quarter of the device's memory, 2 GiB on CPU), "on" (an error if it does not fit),
      # "off" (stream it from the host).
      device_resident="auto", device_budget_mb=0.0))
  # compute_dtype: float32 | bfloat16 | float16 (params and optimizer state stay param_dtype);
  # remat: recompute each block's activations in the backward pass (resnet18, resnet20, gpt).
  c.model = ml_collections.ConfigDict(dict(name="mlp", compute_dtype="float32",
                                           param_dtype="float32", remat=False))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine",
      warmup_epochs=0.0, step_epochs=(), step_factor=0.1, b1=0.9, b2=0.999))
  c.train = ml_collections.ConfigDict(dict(
      epochs=20, batch_size=32, eval_batch_size=256, progress=True,
      # mid-run checkpoints (a killed run resumes at the batch where it stopped); 0 = off.
      checkpoint_every_steps=0, checkpoint_minutes=10.0,
      # micro-batches per optimizer step (batch_size rows in all); loss scale for float16 compute.
      accumulation_steps=1, loss_scale=1.0,
      # One compiled program per run (prunejax.fused): on a device-resident split, run
      # steps_per_dispatch steps per dispatch in one lax.scan (0: a whole epoch, or 1 for
      # convolutions on CPU, which XLA runs slowly inside loops), and train the replicas of a
      # setting (seeds, score seeds, equal-size subsets) as one vmapped program (vmap_replicas:
      # "on" | "off" | "auto" = on accelerators, not on CPU where it measured slower). fused=False: the host
      # loop, one step per dispatch.
      fused=True, steps_per_dispatch=0, vmap_replicas="auto"))
  c.data_pruning = ml_collections.ConfigDict(dict(
      keep_fractions=(0.3, 0.5, 0.7), keep="hard", class_balanced=False, offset=0.0,
      conventions=("epochs",), score_epochs=3, score_seeds=2, dynamic_keep=0.5,
      tracker_epochs=10, prototypes_k=10, knn_k=10, label_quality_folds=5,
      label_quality_epochs=10))
  c.batch_pruning = ml_collections.ConfigDict(dict(keep_fraction=0.5, score="loss"))
  c.semi_batch = ml_collections.ConfigDict(dict(prune_ratio=0.5, delta=0.875))
  c.iterative = ml_collections.ConfigDict(dict(prune_per_round=0.3, target_keep=0.3, score="el2n",
                                               score_epochs=3))
  c.imp = ml_collections.ConfigDict(dict(
      method="magnitude", prune_per_round=0.5, target_sparsity=0.9, scope="global", rewind_step=0,
      reset_optimizer=True,
      max_rounds=ml_collections.FieldReference(None, field_type=int), prune_head=True))
  c.pai = ml_collections.ConfigDict(dict(methods=("magnitude", "random", "snip", "grasp", "synflow"),
                                         sparsities=(0.5, 0.8, 0.9)))
  c.joint = ml_collections.ConfigDict(dict(data="semi_batch"))
  # RHO-LOSS: the irreducible-loss model (holdout_fraction 0: two cross-fitted halves instead of a
  # holdout; model: overrides of the config's model, e.g. a smaller width).
  c.rho_loss = ml_collections.ConfigDict(dict(holdout_fraction=0.0, epochs=3, model={}))
  # Deduplication: first="off" | "exact" | "exact_and_leakage" | "semantic" | "audit" before any
  # strategy ("audit": one prunejax.audit of the training split, then the examples flagged with a
  # type in audit_remove go; experiments/cleaning.py); the "semdedup" strategy keeps
  # data_pruning.keep_fractions by SemDeDup (eps set per fraction).
  c.dedup = ml_collections.ConfigDict(dict(
      first="off", eps=0.05, num_clusters=50, keep="farthest",
      audit_remove=("label", "exact_duplicate", "near_duplicate", "leakage"),
      audit_max_removed=0.5))
  # Post-training pruning (the "post_training" strategy): magnitude, Wanda and SparseGPT on the
  # trained model at each sparsity (a fraction or "N:M", keep N of M), no retraining; Wanda and
  # SparseGPT calibrated on calibration_size training examples chosen randomly or by EL2N;
  # sequential: "group" (input group by input group), "block" (block by block, as the papers' code)
  # or False (every layer on the dense model), see prunejax.masks.posttraining.
  c.post_training = ml_collections.ConfigDict(dict(
      methods=("magnitude", "wanda", "sparsegpt"), sparsities=(0.5, 0.6, 0.7, "2:4"),
      calibration=("random", "el2n_hard", "el2n_easy"), calibration_size=128, error_size=256,
      batch_size=64, wanda_scope="row", sparsegpt_scope="layerwise", sequential="group",
      blocksize=128, damp=0.01, prune_head=False))
  return c
