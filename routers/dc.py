"""RouterDC (arXiv 2409.19886): a query encoder fine-tuned with two contrastive losses, and one
learned vector per expert.

Training starts from all-MiniLM-L6-v2 (the default routing embedder) and minimises, per batch,
- query <-> experts: each query's embedding is pulled toward the vectors of the experts that got
  it right and pushed from those that got it wrong (InfoNCE over cosine / `temperature`, one term
  per right expert against all wrong ones; rows where every expert agrees teach nothing and are
  skipped);
- query <-> query: k-means groups the training queries (`query_clusters`, on the default
  embeddings); each query is pulled toward a query of its group and pushed from the batch's
  queries of other groups (weight `query_weight`).
A logistic gate per expert over the query's cosines to every expert vector (fitted on the training
queries' fine-tuned embeddings) turns them into predicted success, the score every router speaks:
on MMLU-Pro the plain argmax of the cosines (RouterDC's rule) lands below the single best, the
gates above it.

The encoder is exported to ONNX with int8 weights like the default embedder (same latency), kept in
the coe cache under a key of the fitting data and options (so a refit on the same data reuses it)
and saved beside the router (`encoder/`). Other embedding routers use it with `encoder=FOLDER`
(e.g. knn over the fine-tuned embeddings). Training imports torch and transformers inside `fit`;
scoring runs on onnxruntime and numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from routers.base import EmbeddingRouter, OutcomeData, encoder_embed
from routers.embedder import shared_embedder
from routers.linear import LinearModel, train_logistic

ENCODER_FOLDER = "encoder"  # beside router.json in a saved router


class DCRouter(EmbeddingRouter):
    name = "dc"
    default_margin = 0.0
    config_fields = EmbeddingRouter.config_fields + (
        "temperature", "query_weight", "query_clusters", "epochs", "max_steps", "batch_size", "max_tokens",
        "learning_rate", "seed")
    array_fields = EmbeddingRouter.array_fields + ("expert_vectors",)
    model_fields = ("cosine_calibration",)  # not `calibration`: Router.fit resets that one (the cost-threshold record)

    def __init__(self, temperature: float = 0.1, query_weight: float = 1.0, query_clusters: int = 20, epochs: int = 1,
                 max_steps: int = 150, batch_size: int = 32, max_tokens: int = 96, learning_rate: float = 5e-5,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.query_weight = query_weight
        self.query_clusters = query_clusters
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.learning_rate = learning_rate
        self.seed = seed
        self.expert_vectors = np.zeros((0, 0), dtype=np.float32)
        self.cosine_calibration: LinearModel | None = None

    def training_key(self, data: OutcomeData) -> str:
        options = {name: getattr(self, name) for name in ("temperature", "query_weight", "query_clusters", "epochs",
                                                            "max_steps", "batch_size", "max_tokens", "learning_rate", "seed")}
        digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
        digest.update("\x00".join(data.texts).encode())
        digest.update(np.ascontiguousarray(np.nan_to_num(data.outcomes, nan=-1.0)).tobytes())
        digest.update("\x00".join(data.experts).encode())
        digest.update(shared_embedder().cache_key.encode())  # what computed the base embeddings it trains on
        return digest.hexdigest()[:16]

    def fit_embeddings(self, data: OutcomeData, vectors: np.ndarray) -> None:
        from core.paths import cache_dir

        folder = cache_dir() / "encoders" / f"dc-{self.training_key(data)}"
        state_path = folder / "router_state.npz"
        if not state_path.is_file():
            from filelock import FileLock

            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder.parent / f"{folder.name}.lock")):
                if not state_path.is_file():
                    train_encoder(self, data, np.asarray(vectors, dtype=np.float32), folder)
        with np.load(state_path) as npz:
            self.expert_vectors = npz["expert_vectors"]
        self.encoder = str(folder)
        self.embed = encoder_embed(self.encoder)
        from routers.embedder import embedder_at

        cosines = embedder_at(folder).embed_cached(data.texts) @ self.expert_vectors.T
        targets = np.where(np.isnan(data.outcomes), self.prior[None, :], data.outcomes)
        self.cosine_calibration = train_logistic(cosines, targets, l2=1e-3, steps=300)

    def scores_from_embeddings(self, vectors: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        cosine = np.asarray(vectors, dtype=np.float64) @ self.expert_vectors.T.astype(np.float64)
        scores = self.cosine_calibration.sigmoid(cosine)
        explanations = [f"fine-tuned encoder: query closest to {self.experts[int(np.argmax(c))]}'s vector "
                        f"(cosine {c.max():.2f})" for c in cosine]
        return scores, explanations

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        target = Path(directory) / ENCODER_FOLDER
        if self.encoder and Path(self.encoder).resolve() != target.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.encoder, target, ignore=shutil.ignore_patterns("*.lock", "router_state.npz"))

    @classmethod
    def load(cls, directory: str | Path, **kwargs) -> DCRouter:
        folder = Path(directory) / ENCODER_FOLDER
        if folder.is_dir() and "embed" not in kwargs:
            kwargs = {"encoder": str(folder), **kwargs}  # the copy saved with it, not the fitting machine's cache
        router = super().load(directory, **kwargs)
        if folder.is_dir():
            router.encoder = str(folder)
        return router


def train_encoder(router: DCRouter, data: OutcomeData, base_vectors: np.ndarray, folder: Path) -> None:
    """Fine-tune all-MiniLM-L6-v2 with RouterDC's two losses; export it to `folder` as ONNX int8 and
    write the expert vectors to `folder/router_state.npz`."""
    import faiss
    import torch
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    from routers.embedder import QUANTIZED_ONNX, embedder_model_dir, export_onnx

    torch.manual_seed(router.seed)
    rng = np.random.default_rng(router.seed)
    source = embedder_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModel.from_pretrained(str(source), attn_implementation="eager")
    outcomes = data.outcomes
    observed = ~np.isnan(outcomes)
    right = observed & (np.nan_to_num(outcomes) >= 0.5)
    wrong = observed & (np.nan_to_num(outcomes, nan=1.0) < 0.5)

    # Expert vectors start at the mean (default) embedding of the queries each expert handles
    # better than the average expert: a warm start the contrastive loss refines.
    advantage = np.clip(np.nan_to_num(outcomes - np.nanmean(np.where(observed, outcomes, np.nan), axis=1, keepdims=True)), 0, None)
    start = advantage.T @ base_vectors + 1e-3 * rng.standard_normal((len(data.experts), base_vectors.shape[1]))
    expert_vectors = torch.nn.Parameter(torch.as_tensor(start / np.linalg.norm(start, axis=1, keepdims=True), dtype=torch.float32))

    groups = max(1, min(router.query_clusters, len(base_vectors) // 2))
    if groups > 1:
        kmeans = faiss.Kmeans(base_vectors.shape[1], groups, niter=20, seed=router.seed, spherical=True, verbose=False,
                              min_points_per_centroid=1)
        kmeans.train(np.ascontiguousarray(base_vectors))
        group = np.argmax(base_vectors @ kmeans.centroids.T, axis=1)
    else:
        group = np.zeros(len(base_vectors), dtype=int)
    members = {g: np.flatnonzero(group == g) for g in np.unique(group)}

    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=router.max_tokens, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    optimiser = torch.optim.AdamW([{"params": model.parameters(), "lr": router.learning_rate},
                                   {"params": [expert_vectors], "lr": 1e-3}], weight_decay=0.01)
    half = max(1, router.batch_size // 2)
    steps_per_epoch = max(1, int(np.ceil(len(data.texts) / half)))
    steps = max(1, min(router.max_steps, router.epochs * steps_per_epoch))
    order = np.concatenate([rng.permutation(len(data.texts)) for _ in range(router.epochs + 1)])
    model.train()
    right_t, wrong_t = torch.as_tensor(right), torch.as_tensor(wrong)
    for step in tqdm(range(steps), desc="RouterDC encoder", unit="step", disable=os.environ.get("COE_QUIET") == "1"):
        anchors = order[step * half:(step + 1) * half]
        partners = np.array([rng.choice(members[group[a]]) for a in anchors])
        rows = np.concatenate([anchors, partners])
        embedded = encode([data.texts[i] for i in rows])
        similarity = embedded @ torch.nn.functional.normalize(expert_vectors, dim=-1).T / router.temperature
        pos, neg = right_t[rows], wrong_t[rows]
        usable = pos.any(1) & neg.any(1)
        loss = torch.zeros(())
        if usable.any():
            s, p, n = similarity[usable], pos[usable], neg[usable]
            negatives = torch.logsumexp(s.masked_fill(~n, -1e9), dim=1, keepdim=True)  # (rows, 1)
            per_positive = -(s - torch.logaddexp(s, negatives))  # -log e^s_p / (e^s_p + sum_n e^s_n)
            loss = loss + ((per_positive * p).sum(1) / p.sum(1)).mean()
        if router.query_weight > 0 and groups > 1:
            g = torch.as_tensor(group[rows])
            pair = embedded @ embedded.T / router.temperature
            count = len(anchors)
            target = torch.cat([torch.arange(count, 2 * count), torch.arange(count)])  # each anchor's partner and back
            same = (g[:, None] == g[None, :])
            keep = ~same | torch.nn.functional.one_hot(target, 2 * count).bool()  # other groups are the negatives
            keep &= ~torch.eye(2 * count, dtype=torch.bool)
            loss = loss + router.query_weight * torch.nn.functional.cross_entropy(pair.masked_fill(~keep, -1e9), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    model.eval()
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(expert_vectors, dim=-1).numpy()

    staging = folder / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "sentence_bert_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, staging / name)
    shutil.copytree(source / "1_Pooling", staging / "1_Pooling", dirs_exist_ok=True)
    export_onnx(staging, staging, quantized=True)
    for name in ("tokenizer.json", "sentence_bert_config.json", QUANTIZED_ONNX):
        shutil.copy(staging / name, folder / name)
    shutil.copytree(staging / "1_Pooling", folder / "1_Pooling", dirs_exist_ok=True)
    shutil.rmtree(staging)
    (folder / "fingerprint.txt").write_text(folder.name)
    np.savez(folder / "router_state.npz", expert_vectors=vectors.astype(np.float32))
