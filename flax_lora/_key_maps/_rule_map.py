"""A key map as a table of rules: each a path pattern and the PyTorch module names it gives.

A rule's pattern must ``re.fullmatch`` the kernel path (a leading ``params/``, the collection of a
Linen variables dict, is dropped first); its names are `re.Match.expand` templates (``\\1`` is the
first group) with every ``/`` of the result turned into ``.``. The first rule that matches wins;
a path no rule matches has no PyTorch twin (``None``). A rule with several names is a fused
kernel (see `save_peft`'s tuple values); ``{expert}`` and ``{layer}`` stay in the names as written.
"""

from __future__ import annotations

import dataclasses
import re

ModuleNames = str | tuple[str, ...]
"""What a key map gives for a kernel: one module name, or the names of a fused kernel's parts."""

Rule = tuple[str, ModuleNames]
"""``(pattern, names)``: a regex that must ``re.fullmatch`` the path, and the name templates."""


@dataclasses.dataclass(frozen=True)
class RuleMap:
    """A key map made of rules: a function of a kernel path, with a name and its table shown.

    Attributes:
      name: the catalogue's name of the family (``"tunix/llama3"``).
      rules: the ordered ``(pattern, names)`` pairs; the first that matches a path names it.
    """

    name: str
    rules: tuple[Rule, ...]
    _compiled: tuple[tuple[re.Pattern[str], ModuleNames], ...] = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        compiled = tuple((re.compile(pattern), names) for pattern, names in self.rules)
        object.__setattr__(self, "_compiled", compiled)

    def __call__(self, path: str) -> ModuleNames | None:
        """The PyTorch module name(s) of the kernel at ``path``, or ``None`` for no twin."""
        if not isinstance(path, str):
            raise TypeError(f"key map {self.name!r}: a path must be a str; got {path!r}.")
        path = path.removeprefix("params/")
        for pattern, names in self._compiled:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if isinstance(names, str):
                return match.expand(names).replace("/", ".")
            return tuple(match.expand(n).replace("/", ".") for n in names)
        return None
