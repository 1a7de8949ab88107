"""A target label set as the prompt shows it and as answers are read back.

Labels may contain spaces or punctuation ("political party", "B/W"); markup cannot. Each label gets a prompt
name (word characters only) used in prompts and grammars, and answers are mapped back to the label through the
prompt name, the label itself or a configured synonym, compared case- and separator-insensitively.
"""

import re
from typing import Dict, Iterable, List, Optional


def _key(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.lower())


def prompt_name(label: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"\W", "_", label.strip())).strip("_")


class LabelSet:
    def __init__(
        self,
        labels: Iterable[str],
        definitions: Optional[Dict[str, str]] = None,
        synonyms: Optional[Dict[str, str]] = None,
    ):
        self.labels: List[str] = list(dict.fromkeys(labels))
        self.definitions = dict(definitions or {})
        self.synonyms = dict(synonyms or {})
        self.prompt_names: Dict[str, str] = {}
        lookup: Dict[str, str] = {}
        for label in self.labels:
            name = prompt_name(label)
            if not name:
                raise ValueError(f"Label {label!r} has no letters or digits to name it by in a prompt")
            if _key(name) in lookup and lookup[_key(name)] != label:
                raise ValueError(f"Labels {lookup[_key(name)]!r} and {label!r} are indistinguishable in a prompt")
            self.prompt_names[label] = name
            lookup[_key(name)] = label
        unknown_def = set(self.definitions) - set(self.labels)
        if unknown_def:
            raise ValueError(f"Definitions given for labels not in the label set: {sorted(unknown_def)}")
        for alias, label in self.synonyms.items():
            if label not in self.labels:
                raise ValueError(f"Synonym {alias!r} maps to {label!r}, which is not in the label set")
            lookup.setdefault(_key(alias), label)
        self._lookup = lookup

    def restricted(self, labels: Iterable[str]) -> "LabelSet":
        """A label set of ``labels`` keeping the definitions and synonyms of those among them."""
        labels = list(labels)
        return LabelSet(
            labels,
            {k: v for k, v in self.definitions.items() if k in labels},
            {k: v for k, v in self.synonyms.items() if v in labels},
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(self.labels)

    def resolve(self, answer_label: str) -> Optional[str]:
        """The label an answer's label text means, or None if it means none of them."""
        return self._lookup.get(_key(answer_label))

    def names(self) -> List[str]:
        return [self.prompt_names[lab] for lab in self.labels]
