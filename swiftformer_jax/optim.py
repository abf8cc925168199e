"""The official recipe's optimisation math as pure functions: lr schedule, decay mask, AGC, AdamW, EMA.

What the official run (Amshaker/SwiftFormer `main.py`, timm 0.5.4) did, and what each piece here matches:
- Learning rate: `--lr 2e-3` at a global batch of 2048 (16 GPUs x 128), *not* rescaled: the DeiT line
  `linear_scaled_lr = args.lr * args.batch_size * world_size / 512.0` is commented out in main.py
  ("better not to scale up lr for AdamW optimizer"). `scaled_learning_rate` offers linear scaling as an
  option, relative to 2048 so that the official batch keeps the official lr.
- Schedule: timm `CosineLRScheduler(t_initial=epochs, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6,
  cycle_limit=1, warmup_prefix=False, t_in_epochs=True)`, built by `timm.scheduler.create_scheduler`.
  main.py calls `lr_scheduler.step(epoch)` *after* training epoch `epoch`, so epoch e >= 1 trains with
  timm's value at index e - 1 and epoch 0 with `warmup_lr_init` (a one-epoch lag inherited from DeiT;
  timm's own train.py steps with `epoch + 1`). `learning_rate_schedule(per_epoch=True,
  lag_one_epoch=True)` reproduces that exactly; the default is timm's formula per optimizer step.
- Weight decay: timm `create_optimizer` with `filter_bias_and_bn=True`: parameters that are 1-D in
  PyTorch or whose name ends in `.bias` get no decay; the rest (conv/linear weights, layer scales of
  PyTorch shape (C, 1, 1), w_g of shape (D, 1)) get 0.025. `weight_decay_mask` applies that rule to
  PyTorch shapes via `layout.torch_shape`. The optimizer is `torch.optim.AdamW(betas=(0.9, 0.999),
  eps=1e-8)`, whose decoupled decay `p *= 1 - lr * wd` equals optax.adamw's `-lr * wd * p` term.
- Clipping: timm's `NativeScaler(clip_grad=0.01, clip_mode="agc")` -> `adaptive_clip_grad(params,
  0.01)` (eps 1e-3), on the DDP-averaged gradient (so on the global-batch gradient, as here).
- EMA: `timm.utils.ModelEma(decay=0.99996)` updated after every optimizer step over the whole
  state_dict: parameters *and* BN running statistics. (The official loop evaluates the raw model; the
  EMA is only saved in the checkpoint.)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from swiftformer_jax import layout

CLIP_MODES = ("agc", "norm", "value", "none")


# ----------------------------------------------------------------------------------------------------
# Durations and learning rate
# ----------------------------------------------------------------------------------------------------


def steps_from(epochs: float | None, steps: int | None, steps_per_epoch: int | None) -> int:
    """A duration in optimizer steps, from a config that gives it in steps or in epochs.

    `steps` wins when it is > 0 (the convention of `config.total_steps`); otherwise `epochs *
    steps_per_epoch`, rounded to the nearest step. One place for this rule, so warm-up, total length,
    eval and checkpoint intervals are all converted alike.
    """
    if steps is not None and steps > 0:
        if int(steps) != steps:
            raise ValueError(f"steps must be a whole number, got {steps!r}")
        return int(steps)
    if epochs is None:
        raise ValueError("give a duration: steps > 0 or epochs (with steps_per_epoch)")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if steps_per_epoch is None or steps_per_epoch <= 0:
        raise ValueError(
            f"converting {epochs} epochs to steps needs steps_per_epoch > 0, got {steps_per_epoch!r}"
        )
    return int(round(epochs * steps_per_epoch))


def scaled_learning_rate(
    base_lr: float, batch_size: int, reference_batch: int = 2048, *, scale: bool = False
) -> float:
    """`base_lr`, or `base_lr * batch_size / reference_batch` when `scale` is True.

    The official run did not scale (its linear-scaling line is commented out) and used 2e-3 at a
    global batch of 2048; scaling relative to 2048 keeps that value at the official batch. The DeiT
    rule the official code disabled used a reference of 512.
    """
    if batch_size <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be > 0, got {batch_size} and {reference_batch}")
    return base_lr * batch_size / reference_batch if scale else base_lr


def timm_cosine_lr(
    t, *, base_lr: float, warmup_lr: float, min_lr: float, warmup_t: float, t_initial: float
) -> jax.Array:
    """timm `CosineLRScheduler._get_lr(t)` for one cycle, no k-decay, no noise, warmup_prefix=False.

    Warm-up is linear from `warmup_lr` at t = 0 towards `base_lr`, reaching it only at t = warmup_t,
    which already belongs to the cosine: the cosine runs over [0, t_initial) from t = 0 (warm-up is not
    a prefix), so the first cosine value is slightly below `base_lr`. From t >= t_initial the cycle
    limit is reached and the value is `min_lr`. `t` may be traced.
    """
    t = jnp.asarray(t, jnp.float32)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / t_initial))
    lr = jnp.where(t < t_initial, cosine, min_lr)
    if warmup_t > 0:
        warm = warmup_lr + t * ((base_lr - warmup_lr) / warmup_t)
        lr = jnp.where(t < warmup_t, warm, lr)
    return lr


def learning_rate_schedule(
    *,
    base_lr: float,
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-5,
    warmup_steps: int,
    total_steps: int,
    steps_per_epoch: int | None = None,
    per_epoch: bool = False,
    lag_one_epoch: bool = False,
) -> optax.Schedule:
    """Optax schedule (step -> lr): timm's warm-up + cosine, per step or stepped per epoch.

    Per step (default): timm's formula with t = the optimizer step, warmup_t = `warmup_steps`,
    t_initial = `total_steps` (timm's `step_on_epochs=False` conversion). `per_epoch=True`: the lr is
    constant within an epoch and equals timm's value at the epoch index, with warm-up and length in
    epochs (`warmup_steps` and `total_steps` must then be whole epochs). `lag_one_epoch=True` (only
    with `per_epoch`) uses the index e - 1 for epoch e >= 1, as the official main.py does by calling
    `lr_scheduler.step(epoch)` after each epoch; see the module docstring.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if lag_one_epoch and not per_epoch:
        raise ValueError("lag_one_epoch reproduces per-epoch stepping; it needs per_epoch=True")
    kwargs = dict(base_lr=base_lr, warmup_lr=warmup_lr, min_lr=min_lr)

    if not per_epoch:
        def schedule(step):
            return timm_cosine_lr(step, warmup_t=warmup_steps, t_initial=total_steps, **kwargs)
        return schedule

    if steps_per_epoch is None or steps_per_epoch <= 0:
        raise ValueError(f"per_epoch=True needs steps_per_epoch > 0, got {steps_per_epoch!r}")
    if warmup_steps % steps_per_epoch or total_steps % steps_per_epoch:
        raise ValueError(
            f"per_epoch=True needs whole epochs: warmup_steps={warmup_steps} and "
            f"total_steps={total_steps} must be multiples of steps_per_epoch={steps_per_epoch}"
        )
    warmup_epochs = warmup_steps // steps_per_epoch
    total_epochs = total_steps // steps_per_epoch
    lag = 1 if lag_one_epoch else 0

    def epoch_schedule(step):
        epoch = jnp.maximum(jnp.asarray(step) // steps_per_epoch - lag, 0)
        return timm_cosine_lr(epoch, warmup_t=warmup_epochs, t_initial=total_epochs, **kwargs)

    return epoch_schedule


# ----------------------------------------------------------------------------------------------------
# Which leaves get weight decay, and how AGC groups each leaf
# ----------------------------------------------------------------------------------------------------


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unsupported pytree path entry {entry!r}")


def _path_names(path) -> tuple[str, ...]:
    return tuple(_key_name(entry) for entry in path)


def _check_params_tree(params) -> None:
    if isinstance(params, dict) and ("params" in params or "batch_stats" in params):
        raise ValueError(
            "expected the `params` collection (variables['params']), got a tree with top-level keys "
            f"{sorted(params)}"
        )


def weight_decay_mask(params) -> Any:
    """Pytree of Python bools like `params`: True where the official recipe applies weight decay.

    timm's rule (`len(shape) == 1 or name.endswith('.bias')` -> no decay), evaluated on the
    *PyTorch* shape: layer scales ((C, 1, 1) in PyTorch, (C,) here) and w_g ((D, 1)) are decayed; BN
    scale/bias and every bias are not. Works on arrays or `jax.ShapeDtypeStruct`s (eval_shape).
    """
    _check_params_tree(params)

    def decays(path, leaf) -> bool:
        names = _path_names(path)
        torch_shape = layout.torch_shape(names, leaf.shape)
        return len(torch_shape) > 1 and names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def agc_reduce_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...] | None:
    """Flax axes over which timm's `unitwise_norm` reduces the leaf at `path`; None = whole tensor.

    timm takes the norm over all PyTorch dims but the first (the output dim), and over the whole
    tensor when the PyTorch tensor is 1-D. In the Flax layout the output dim is the last axis of a
    kernel (HWIO convs, [in, out] Dense for Linear and 1x1 conv) and axis 0 of the other multi-dim
    leaves (layer scales, (C,) here and (C, 1, 1) in PyTorch, so per element; w_g (D, 1), per row).
    """
    names = tuple(path)
    shape = tuple(shape)
    torch_shape = layout.torch_shape(names, shape)
    if len(torch_shape) <= 1:
        return None
    out_axis = len(shape) - 1 if names[-1] == "kernel" else 0
    if shape[out_axis] != torch_shape[0]:
        raise ValueError(
            f"cannot place PyTorch dim 0 of {'/'.join(names)} (Flax {shape}, PyTorch {torch_shape}) "
            "in the Flax layout; teach agc_reduce_axes this leaf kind"
        )
    return tuple(axis for axis in range(len(shape)) if axis != out_axis)


def _unitwise_norm(x: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
    x = x.astype(jnp.float32)
    if axes is None:
        return jnp.sqrt(jnp.sum(jnp.square(x)))
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


# ----------------------------------------------------------------------------------------------------
# Gradient transformations and the optimizer
# ----------------------------------------------------------------------------------------------------


def adaptive_grad_clip(clipping: float = 0.01, eps: float = 1e-3) -> optax.GradientTransformation:
    """timm's `adaptive_clip_grad` (AGC, Brock et al. 2021) leaf by leaf, grouped as PyTorch groups it.

    Per unit (see `agc_reduce_axes`): max_norm = max(||param||, eps) * clipping; a gradient whose
    norm is >= max_norm is scaled by max_norm / max(||grad||, 1e-6). Needs the current params
    (`update(grads, state, params)`), before the optimizer step, as timm clips before `optimizer.step`.
    optax.adaptive_grad_clip groups layer scales and w_g differently, hence this one.
    """
    if clipping <= 0:
        raise ValueError(f"AGC clipping factor must be > 0, got {clipping}")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adaptive_grad_clip needs the current params: call update(grads, state, params)")

        def clip(path, grad, param):
            axes = agc_reduce_axes(_path_names(path), grad.shape)
            max_norm = jnp.maximum(_unitwise_norm(param, axes), eps) * clipping
            grad_norm = _unitwise_norm(grad, axes)
            scaled = grad * (max_norm / jnp.maximum(grad_norm, 1e-6)).astype(grad.dtype)
            return jnp.where(grad_norm < max_norm, grad, scaled)

        return jax.tree_util.tree_map_with_path(clip, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def gradient_clipping(clip_mode: str | None, clip_grad: float | None) -> optax.GradientTransformation:
    """timm's `dispatch_clip_grad` modes as optax transformations; "none" (or None) clips nothing.

    "agc": `adaptive_grad_clip(clip_grad)`; "norm": global-norm clipping (torch adds 1e-6 to the norm
    in the scale, optax does not); "value": element-wise clipping to [-clip_grad, clip_grad].
    """
    if clip_mode not in CLIP_MODES + (None,):
        raise ValueError(f"unknown clip_mode {clip_mode!r}; valid: {', '.join(CLIP_MODES)} or None")
    if clip_mode in (None, "none"):
        return optax.identity()
    if clip_grad is None or clip_grad <= 0:
        raise ValueError(f"clip_mode={clip_mode!r} needs clip_grad > 0, got {clip_grad!r}")
    if clip_mode == "agc":
        return adaptive_grad_clip(clip_grad)
    if clip_mode == "norm":
        return optax.clip_by_global_norm(clip_grad)
    return optax.clip(clip_grad)


def create_optimizer(
    *,
    learning_rate: optax.ScalarOrSchedule,
    params_for_mask,
    weight_decay: float = 0.025,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_mode: str | None = "agc",
    clip_grad: float | None = 0.01,
) -> optax.GradientTransformation:
    """Gradient clipping (AGC by default), then AdamW with the official decay mask.

    optax.adamw computes lr * (m_hat / (sqrt(v_hat) + eps) + wd * p): the same update as
    torch.optim.AdamW (`p *= 1 - lr * wd`, then the Adam step), both using the pre-step params.
    `params_for_mask` is the params tree (arrays or `jax.eval_shape` structs) the mask is built from;
    it must have the structure of the params the optimizer will see.
    """
    mask = weight_decay_mask(params_for_mask)
    return optax.chain(
        gradient_clipping(clip_mode, clip_grad),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
    )


def global_norm(tree) -> jax.Array:
    """L2 norm over every leaf of `tree` (float32), for logging gradient and update norms."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


# ----------------------------------------------------------------------------------------------------
# Model EMA
# ----------------------------------------------------------------------------------------------------


def ema_update(ema_tree, new_tree, decay) -> Any:
    """One EMA step, ema <- decay * ema + (1 - decay) * new, leaf by leaf (keeps the EMA's dtypes).

    timm's ModelEma (what the official run used, decay 0.99996) applies this after every optimizer
    step to the whole state_dict, so call it on params *and* batch_stats. Written as
    ema + (1 - decay) * (new - ema) (timm ModelEmaV3's lerp): equal in exact arithmetic, and with
    1 - decay = 4e-5 it rounds less in float32 than the two-product form. `decay` may be traced.
    """
    weight = 1.0 - jnp.asarray(decay, jnp.float32)

    def step(ema, new):
        delta = new.astype(jnp.float32) - ema.astype(jnp.float32)
        return (ema.astype(jnp.float32) + weight * delta).astype(ema.dtype)

    return jax.tree_util.tree_map(step, ema_tree, new_tree)
