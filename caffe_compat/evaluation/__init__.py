"""The paper's evaluation: its datasets prepared as Caffe inputs, its net and solver,
Recall@K, k-means, NMI and F1 as its MATLAB code computes them, figures, and the whole
reproduction of its results."""
