"""Captions made from class names, so text conditioning trains on real images.

With ``data.caption_template = "a photo of {}"`` every item of a labelled
dataset gets ``item["caption"]``, e.g. label 7 of Fashion-MNIST ->
``"a photo of a sneaker"``. The names carry their article so that the
template stays a plain ``str.format``.
"""

from __future__ import annotations

from typing import Sequence

from torch.utils.data import Dataset

from ..errors import ConfigError

CAPTION_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                      "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot"),
    "mnist": ("the digit zero", "the digit one", "the digit two", "the digit three",
              "the digit four", "the digit five", "the digit six", "the digit seven",
              "the digit eight", "the digit nine"),
}
FAMILY: dict[str, str] = {"fashion-mnist-embedded": "fashion-mnist", "fashion-mnist": "fashion-mnist",
                          "mnist": "mnist"}


def caption_names(data_name: str) -> tuple[str, ...]:
    """The caption name of each class of the data source, or a ConfigError."""
    if data_name not in FAMILY:
        raise ConfigError(f"data.caption_template: no class names known for data '{data_name}' "
                          f"(captions work for {', '.join(FAMILY)})")
    return CAPTION_NAMES[FAMILY[data_name]]


def make_captions(template: str, names: Sequence[str], labels) -> list[str]:
    """template.format(name of each label) for an iterable of integer labels."""
    return [template.format(names[int(label)]) for label in labels]


class Captioned(Dataset):
    """Wraps a labelled dataset; adds ``item["caption"]`` = template.format(class name)."""

    def __init__(self, dataset: Dataset, template: str, names: Sequence[str]) -> None:
        self.dataset, self.template, self.names = dataset, template, tuple(names)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_classes(self):
        return getattr(self.dataset, "num_classes", None)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        if "class_label" not in item:
            raise ConfigError("data.caption_template: the dataset has no class labels to caption")
        item["caption"] = make_captions(self.template, self.names, [item["class_label"]])[0]
        return item
