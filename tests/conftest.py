import os

import pytest
import spacy

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def nlp():
    return spacy.blank("en")
