"""The paper's published numbers, which `reproduce` compares a run with and the Recall@K
figure draws beside ours."""

# Recall@K (%) of the lifted structured loss at 64-d embeddings. CUB-200-2011 and Online
# Products as later papers read them off the paper's figures; Cars196 as later work
# tabulates it (not checked against the paper's figure here). NMI/F1 appear in the
# paper only as curves over embedding sizes, so no single figure is quoted.
PUBLISHED = {
    "cub": {"recall_k": (1, 2, 4, 8), "recall": (47.2, 58.9, 70.2, 80.2)},
    "cars": {"recall_k": (1, 2, 4, 8), "recall": (49.0, 60.3, 72.1, 81.5)},
    "sop": {"recall_k": (1, 10, 100, 1000), "recall": (62.1, 79.8, 91.3, 97.4)},
}
