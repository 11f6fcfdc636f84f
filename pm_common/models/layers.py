"""Which of a model's arrays are federated and which stay at the site (FedPer's local layers).

A layer named in `[personalization] local_layers` is a module path of the model (e.g. `net.2`, the
MLP's output layer): every array under it (`net.2.weight`, `net.2.bias`) stays at the site. The
coordinator sends and aggregates only the others, and a site sends only the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def is_local(name: str, local_layers: Sequence[str]) -> bool:
    """Whether the array `name` belongs to one of `local_layers` (the layer itself or under it)."""
    return any(name == layer or name.startswith(layer + ".") for layer in local_layers)


def shared_part(arrays: Mapping[str, T], local_layers: Sequence[str]) -> dict[str, T]:
    """The arrays that are federated: all but the local layers' (order kept)."""
    return {k: v for k, v in arrays.items() if not is_local(k, local_layers)}


def local_part(arrays: Mapping[str, T], local_layers: Sequence[str]) -> dict[str, T]:
    """The arrays that stay at the site."""
    return {k: v for k, v in arrays.items() if is_local(k, local_layers)}


def local_layer_problems(names: Iterable[str], local_layers: Sequence[str], model: str) -> list[str]:
    """Why `local_layers` cannot split a model whose arrays are `names` ([] if they can): a layer that
    names no array, or layers that leave nothing to federate.

    Args:
        names: the model's state-dict keys.
        local_layers: the study's `[personalization] local_layers`.
        model: the model's name, for the message.

    Returns:
        One line per problem, each naming `[personalization].local_layers` and the allowed layers.
    """
    names = list(names)
    layers = sorted({n.rsplit(".", 1)[0] for n in names})
    allowed = ", ".join(f'"{layer}"' for layer in layers)
    problems = [
        f"[personalization].local_layers: {layer!r} is no layer of model {model!r}; its layers are {allowed}"
        for layer in local_layers if not any(is_local(n, [layer]) for n in names)
    ]
    if not problems and not shared_part(dict.fromkeys(names), local_layers):
        problems.append(f"[personalization].local_layers: every layer of model {model!r} would stay at the "
                        "sites, so nothing would be federated; keep at least one shared layer (e.g. [model] "
                        "name = \"mlp\" and local_layers = the output layer)")
    return problems
