"""Float64 numpy forwards, and backward passes written by hand, of the tests' small models,
independent of flax_lora (the per-kernel formulas are `support.refs`):

- `dg_layer64`, `dg_stack64`: the DoRA scan stack of `support.dg_stack`, each layer ``l`` run
  with ``W'[l] = m[l] * V / ||V||``, ``V = W0[l] + scale * a[l] @ b[l]`` (the norm over the
  kernel's input axes, one value per output unit, as PEFT), or ``W0[l]`` on a layer
  ``LoraConfig(layers=...)`` did not pick; gradients of ``sum(C * y)`` backpropagated through
  ``x + tanh(x @ W1 + b1) @ W2 + b2``; with ``G = dL/dW'[l]`` and the norm detached,
  ``dL/dm = sum_in(G * V) / ||V||``, ``dL/dV = G * m / ||V||``, ``dL/da = scale * dL/dV @ b.T``,
  ``dL/db = scale * a.T @ dL/dV``;
- `mlp_stack64`: the residual MLP stack of `support.mlp_stack` with LoRA on fc1 and fc2, and the
  gradients of ``sum(c * y)`` w.r.t. their factors;
- `nested64`: `support.models.NestedStack` (a scan of scans), example by example, each with its
  own adapter set of a routing stack.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import dg_stack
from .refs import as_matrix
from .trees import adapter_entries, leaves_by_path


def dg_layer64(w0: np.ndarray, w: Any, layer: int, in_axes: tuple[int, ...]) -> dict[str, Any]:
    """Layer ``layer`` of a stacked DoRA adapter ``w``, as matrices in float64."""
    r = w.a.shape[-1]
    k0 = as_matrix(np.asarray(w0[layer], np.float64), in_axes)
    a = np.asarray(w.a[layer], np.float64).reshape(-1, r)
    b = np.asarray(w.b[layer], np.float64).reshape(r, -1)
    m = np.asarray(w.m[layer], np.float64).reshape(-1)
    v = k0 + w.scale * a @ b
    norm = np.sqrt((v**2).sum(axis=0))  # per output unit (column), over the input axes
    picked = w.layers is None or layer in w.layers
    return dict(k=v * (m / norm) if picked else k0, v=v, norm=norm, a=a, b=b, m=m, picked=picked)


def dg_stack64(params: Any, adapters: Any, paths: dict[str, str], name: str) -> dict[str, Any]:
    """The output of `support.dg_stack` model ``name`` on ``X``, the gradients of
    ``sum(C * y)`` w.r.t. a, b, m of both kernels, and the DoRA kernels, in float64."""
    L, X, C = dg_stack.L, dg_stack.X, dg_stack.C
    base = leaves_by_path(params)
    bias = {k: np.asarray(base[p.replace("kernel", "bias")], np.float64) for k, p in paths.items()}
    ad = adapter_entries(adapters)
    refs = {
        k: [dg_layer64(np.asarray(base[p]), ad[p], i, dg_stack.IN_AXES[name][k]) for i in range(L)]
        for k, p in paths.items()
    }
    h = np.asarray(X, np.float64)
    acts = []
    for i in range(L):  # forward
        k1, k2 = refs["w1"][i]["k"], refs["w2"][i]["k"]
        t = np.tanh(h @ k1 + bias["w1"][i].reshape(-1))
        acts.append((h, t))
        h = h + t @ k2 + bias["w2"][i].reshape(-1)
    y = h
    dh = C.copy()
    g_kernel: dict[str, list[np.ndarray]] = {"w1": [None] * L, "w2": [None] * L}
    for i in reversed(range(L)):  # backward
        x_in, t = acts[i]
        k1, k2 = refs["w1"][i]["k"], refs["w2"][i]["k"]
        g_kernel["w2"][i] = t.T @ dh
        du = (dh @ k2.T) * (1.0 - t**2)
        g_kernel["w1"][i] = x_in.T @ du
        dh = dh + du @ k1.T
    grads = {}
    for k, p in paths.items():
        w = ad[p]
        ga, gb, gm = [], [], []
        for i in range(L):
            ref, g = refs[k][i], g_kernel[k][i]
            if not ref["picked"]:
                ga.append(np.zeros(w.a.shape[1:]))
                gb.append(np.zeros(w.b.shape[1:]))
                gm.append(np.zeros(w.m.shape[1:]))
                continue
            dv = g * (ref["m"] / ref["norm"])
            ga.append((w.scale * dv @ ref["b"].T).reshape(w.a.shape[1:]))
            gb.append((w.scale * ref["a"].T @ dv).reshape(w.b.shape[1:]))
            gm.append(((g * ref["v"]).sum(axis=0) / ref["norm"]).reshape(w.m.shape[1:]))
        grads[p] = dict(a=np.stack(ga), b=np.stack(gb), m=np.stack(gm))
    kernels = {
        p: np.stack([refs[k][i]["k"].reshape(base[p].shape[1:]) for i in range(L)])
        for k, p in paths.items()
    }
    return dict(y=y, grads=grads, kernels=kernels)


def mlp_stack64(p: dict, ad: dict, x: np.ndarray, c: np.ndarray, s: float) -> tuple:
    """Output of the stack and the gradients of ``sum(c * y)`` w.r.t. the fc1/fc2 factors,
    float64, backpropagated by hand through ``x + tanh(x @ W1 + b1) @ W2 + b2`` per layer."""
    n_layers = p["fc1"].shape[0]
    w = {n: p[n] + s * np.einsum("lir,lro->lio", ad[n][0], ad[n][1]) for n in ("fc1", "fc2")}
    xs, hs = [x.astype(np.float64)], []
    for i in range(n_layers):
        h = np.tanh(xs[-1] @ w["fc1"][i] + p["b1"][i])
        hs.append(h)
        xs.append(xs[-1] + h @ w["fc2"][i] + p["b2"][i])
    y = xs[-1] @ p["head"] + p["bh"]
    g = c @ p["head"].T
    grads = {n: (np.zeros_like(ad[n][0]), np.zeros_like(ad[n][1])) for n in ("fc1", "fc2")}
    for i in reversed(range(n_layers)):
        a2, b2 = ad["fc2"][0][i], ad["fc2"][1][i]
        grads["fc2"][0][i] = s * hs[i].T @ (g @ b2.T)
        grads["fc2"][1][i] = s * (hs[i] @ a2).T @ g
        gpre = (g @ w["fc2"][i].T) * (1 - hs[i] ** 2)
        a1, b1 = ad["fc1"][0][i], ad["fc1"][1][i]
        grads["fc1"][0][i] = s * xs[i].T @ (gpre @ b1.T)
        grads["fc1"][1][i] = s * (xs[i] @ a1).T @ gpre
        g = g + gpre @ w["fc1"][i].T
    return y, grads


def nested64(params: Any, sets: list[Any], x: np.ndarray, ids: list[int]) -> np.ndarray:
    """`NestedStack` in float64 numpy: ``h = tanh(h @ W[l, i] + bias[l, i])`` for each outer layer
    ``l`` and inner layer ``i``, with ``W = W0 + scale * a @ b`` on the adapted outer layers."""
    leaves = {p: np.asarray(v, np.float64) for p, v in leaves_by_path(params).items()}
    w0 = leaves["params/outer/inner/fc/kernel"]
    bias = leaves["params/outer/inner/fc/bias"]
    rows = []
    for j, k in enumerate(ids):
        w = w0.copy()
        if k >= 0:
            ad = adapter_entries(sets[k])["params/outer/inner/fc/kernel"]
            a, b = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64)
            for l_ in range(w.shape[0]):
                if ad.layers is None or l_ in ad.layers:
                    w[l_] += ad.scale * np.einsum("jir,jro->jio", a[l_], b[l_])
        h = np.asarray(x[j], np.float64)
        for l_ in range(w.shape[0]):
            for i in range(w.shape[1]):
                h = np.tanh(h @ w[l_, i] + bias[l_, i])
        rows.append(h)
    return np.stack(rows)
