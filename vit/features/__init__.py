"""Work on frozen features: extract embeddings, classify with kNN or a linear probe, search similar images,
compare backbones.

    extract_features(backbone, images) -> Features   (features.py: the .safetensors layout)
    Embedder(model, pool)              -> nn.Module  (backbone + pooling, for vit.deploy.runners.create_runner)
    knn_classify(train_x, train_y, x)  -> labels     (DINO: cosine, k=20, T=0.07)
    linear_probe(train_x, train_y)     -> LinearProbe (logistic regression, C tuned on the train split)
    nearest(index, queries, k)         -> scores, rows
    probe_backbone(source, train, val) -> ProbeResult (cached features, both evaluations, speed, size)
    zeroshot_classifier(model, names, templates) -> (D, C) (class names -> text-embedding classifier)

Entry points: ``vit embed``, ``vit probe``, ``vit search``, ``vit zeroshot``.
"""
from .backbone import Embedder, load_backbone, pool_tokens
from .compare import ProbeResult, probe_backbone
from .extract import extract_features
from .features import Features
from .knn import knn_classify
from .linear import LinearProbe, linear_probe
from .search import nearest
from .zeroshot import classify_images, zeroshot_classifier, zeroshot_probabilities

__all__ = ["Embedder", "Features", "LinearProbe", "ProbeResult", "extract_features", "knn_classify", "linear_probe",
           "load_backbone", "nearest", "pool_tokens", "probe_backbone", "zeroshot_classifier", "zeroshot_probabilities",
           "classify_images"]
