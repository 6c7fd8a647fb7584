"""A chain of linear layers with elementwise activations, in numpy, with analytic gradients.

Layer i computes `h_{i+1} = act_i(h_i @ W_i^T + b_i)` with `W_i: [m_i, d_i]`, `b_i: [m_i]` or None.
The last layer of a chain is the model's final linear node (usually with the identity activation).
Everything is float64. Used by the penalised refits (`onnx_esvd.penalty`), which tune the last few
layers' `(W, b)`; the activations are fixed.

Activations (`activation(spec)` normalises a spec):

- "identity", "relu", "sigmoid", "tanh"
- ("leaky_relu", alpha)
- "gelu" or ("gelu", "none") (exact, with erf); ("gelu", "tanh") (tanh approximation)
- ("batchnorm", scale, bias, mean, var, eps): inference batch normalisation per channel, an affine map
- ("add_const", vector): adds a constant per channel
- ("affine", scale, shift): `scale * a + shift` per channel (what the two above become)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import OptionError

_GELU_K = np.sqrt(2.0 / np.pi)
_GELU_C = 0.044715
_SIMPLE = ("identity", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh")


@dataclass(frozen=True, eq=False)
class Activation:
    """One elementwise activation. kind in identity, relu, leaky_relu, sigmoid, tanh, gelu, gelu_tanh,
    affine; `alpha` is leaky_relu's slope; `scale`, `shift: [m]` define affine."""

    kind: str
    alpha: float = 0.01
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None

    def __call__(self, a: np.ndarray) -> np.ndarray:
        """Apply to pre-activations `a: [n, m]`."""
        k = self.kind
        if k == "identity":
            return a
        if k == "relu":
            return np.maximum(a, 0.0)
        if k == "leaky_relu":
            return np.where(a > 0, a, self.alpha * a)
        if k == "sigmoid":
            return 0.5 * (1.0 + np.tanh(0.5 * a))  # the logistic function, without overflow
        if k == "tanh":
            return np.tanh(a)
        if k == "gelu":
            from scipy.special import erf  # exact gelu only (scipy costs a quarter second to import)

            return 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))
        if k == "gelu_tanh":
            return 0.5 * a * (1.0 + np.tanh(_GELU_K * (a + _GELU_C * a**3)))
        return a * self.scale + self.shift  # affine

    def grad(self, a: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """d act / d a at `a` (with `out = act(a)`), elementwise `[n, m]`; None for the identity."""
        k = self.kind
        if k == "identity":
            return None
        if k == "relu":
            return (a > 0).astype(np.float64)
        if k == "leaky_relu":
            return np.where(a > 0, 1.0, self.alpha)
        if k == "sigmoid":
            return out * (1.0 - out)
        if k == "tanh":
            return 1.0 - out * out
        if k == "gelu":
            from scipy.special import erf

            return 0.5 * (1.0 + erf(a / np.sqrt(2.0))) + a * np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
        if k == "gelu_tanh":
            th = np.tanh(_GELU_K * (a + _GELU_C * a**3))
            return 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * _GELU_K * (1.0 + 3 * _GELU_C * a * a)
        return np.broadcast_to(self.scale, a.shape)  # affine


def activation(spec: Any, width: int | None = None) -> Activation:
    """Normalise an activation spec (see the module docstring) for a layer with `width` outputs."""
    if isinstance(spec, Activation):
        return spec
    if spec is None:
        return Activation("identity")
    if isinstance(spec, str):
        spec = (spec,)
    kind, *args = spec
    if kind == "gelu":
        approx = args[0] if args else "none"
        if approx not in ("none", "tanh"):
            raise OptionError(f"gelu approximation {approx!r} is not 'none' or 'tanh'")
        return Activation("gelu" if approx == "none" else "gelu_tanh")
    if kind in _SIMPLE and not args:
        return Activation(kind)
    if kind == "leaky_relu":
        return Activation("leaky_relu", alpha=float(args[0]) if args else 0.01)

    def vec(v: Any, name: str) -> np.ndarray:
        arr = np.asarray(v, dtype=np.float64).ravel()
        if width is not None and arr.size not in (1, width):
            raise OptionError(f"{kind} {name} has {arr.size} values for a layer of width {width}")
        return arr

    if kind == "batchnorm":
        scale, bias, mean, var = (vec(v, nm) for v, nm in zip(args[:4], ("scale", "bias", "mean", "var")))
        eps = float(args[4]) if len(args) > 4 else 1e-5
        mult = scale / np.sqrt(var + eps)
        return Activation("affine", scale=mult, shift=bias - mean * mult)
    if kind == "add_const":
        c = vec(args[0], "constant")
        return Activation("affine", scale=np.ones_like(c), shift=c)
    if kind == "affine":
        return Activation("affine", scale=vec(args[0], "scale"), shift=vec(args[1], "shift"))
    raise OptionError(f"unknown activation {spec!r}: use identity, relu, leaky_relu, sigmoid, tanh, gelu, "
                      "batchnorm, add_const or affine")


@dataclass(frozen=True, eq=False)
class Layer:
    """`W: [m, d]` float64, `b: [m]` float64 or None, activation applied after `h @ W^T + b`."""

    W: np.ndarray
    b: np.ndarray | None
    act: Activation


class Chain:
    """Layers applied in order: `Chain(layers=[(W, b, activation_spec), ...])`.

    The chain copies the arrays (float64) and never changes them; `with_params` returns a new chain.
    """

    def __init__(self, layers: Sequence[Any]) -> None:
        built = []
        width = None
        for i, item in enumerate(layers):
            if isinstance(item, Layer):
                w, b, act = item.W, item.b, item.act
            else:
                w, b, act = (tuple(item) + ("identity",))[:3]
            w = np.array(w, dtype=np.float64, copy=True)
            if w.ndim != 2:
                raise OptionError(f"layer {i} weight has shape {w.shape}, expected [out, in]")
            if width is not None and w.shape[1] != width:
                raise OptionError(f"layer {i} takes {w.shape[1]} inputs but layer {i - 1} gives {width}")
            if b is not None:
                b = np.array(b, dtype=np.float64, copy=True).ravel()
                if b.shape != (w.shape[0],):
                    raise OptionError(f"layer {i} bias has {b.size} values for {w.shape[0]} outputs")
            built.append(Layer(w, b, activation(act, w.shape[0])))
            width = w.shape[0]
        if not built:
            raise OptionError("a chain needs at least one layer")
        self.layers: tuple[Layer, ...] = tuple(built)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def n_inputs(self) -> int:
        return self.layers[0].W.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].W.shape[0]

    def forward(self, x: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Output `[n, m_last]` of layers `start:stop` applied to `x: [n, d_start]` (float64)."""
        h = np.asarray(x, dtype=np.float64)
        for layer in self.layers[start:stop]:
            a = h @ layer.W.T
            if layer.b is not None:
                a += layer.b
            h = layer.act(a)
        return h

    # ---- free parameters of the last K layers, flattened ----
    def params(self, k: int) -> np.ndarray:
        """The last k layers' `(W, b)` flattened into one float64 vector (W row-major, then b if any)."""
        parts = []
        for layer in self.layers[len(self.layers) - k:]:
            parts.append(layer.W.ravel())
            if layer.b is not None:
                parts.append(layer.b)
        return np.concatenate(parts)

    def unflatten(self, k: int, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Split a parameter vector of the last k layers into `[(W, b), ...]` (views of theta)."""
        out, pos = [], 0
        for layer in self.layers[len(self.layers) - k:]:
            size = layer.W.size
            w = theta[pos:pos + size].reshape(layer.W.shape)
            pos += size
            b = None
            if layer.b is not None:
                b = theta[pos:pos + layer.b.size]
                pos += layer.b.size
            out.append((w, b))
        return out

    def with_params(self, k: int, theta: np.ndarray) -> "Chain":
        """A new chain whose last k layers take their `(W, b)` from `theta`."""
        first = len(self.layers) - k
        new = list(self.layers[:first])
        for layer, (w, b) in zip(self.layers[first:], self.unflatten(k, theta)):
            new.append(Layer(w.copy(), None if b is None else b.copy(), layer.act))
        return Chain(new)

    def value_and_grad(self, h_in: np.ndarray, k: int, theta: np.ndarray, loss_grad) -> tuple[float, np.ndarray]:
        """Run the last k layers with parameters `theta` on `h_in: [n, d]` (the input of the first free
        layer), call `loss_grad(out) -> (loss, dloss/dout)` and back-propagate.

        Returns `(loss, dloss/dtheta: same shape as theta)`.
        """
        free = self.layers[len(self.layers) - k:]
        params = self.unflatten(k, theta)
        inputs, pres, posts = [], [], []
        h = h_in
        for layer, (w, b) in zip(free, params):
            inputs.append(h)
            a = h @ w.T
            if b is not None:
                a += b
            h = layer.act(a)
            pres.append(a)
            posts.append(h)
        loss, g = loss_grad(h)
        grads: list[np.ndarray] = []
        for i in range(k - 1, -1, -1):
            layer, (w, b) = free[i], params[i]
            dact = layer.act.grad(pres[i], posts[i])
            ga = g if dact is None else g * dact
            if b is not None:
                grads.append(ga.sum(axis=0))
            grads.append((ga.T @ inputs[i]).ravel())
            if i:
                g = ga @ w
        return loss, np.concatenate(grads[::-1])
