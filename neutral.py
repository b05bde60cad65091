"""P̄ from one photo: the neutral face hidden in a single frame whose mouth may be open or smiling.

A2L is conditioned on P̄, the subject's mean canonical mesh ([A2L: P̄] in the paper's figure). Training has every
frame of a clip to average; `sample.py` has one photo. The photo's mesh is P̄ plus its articulation (jaw, lips,
blink), and A2L cannot tell the two apart, so an open mouth in the photo stays open in every frame. This module
separates them with a linear face model, as 3D morphable models separate identity from expression (Blanz &
Vetter 1999; FaceWarehouse, Cao et al. 2014), fitted on the training clips rather than on scans:

- articulation: the top `modes` principal directions U of the frames about their own identity's mean (the
  within-identity scatter), with variances lambda_k;
- identity: the identity means about their mean mu, a Gaussian with the covariance of their principal directions
  V (variances d_j) plus isotropic `noise` sigma^2 (the part of a new face no training identity spans).

A frame p = mu + (identity offset) + U c: the articulation c has the maximum a posteriori value
c = (U^T W U + diag(1 / lambda))^-1 U^T W (p - mu), W = (V diag(d) V^T + sigma^2 I)^-1, and the neutral face is
p - U c. All in canonical units (inter-ocular distance 1), flattened to D = 478 x 3. Our addition: the paper does
not say how P̄ is obtained from one image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

IDENTITY_MODES = 32  # identity directions kept (at most identities - 1 are non-zero)


class NeutralFace(nn.Module):
    """The fitted face model as buffers (they travel in A2L's state dict); `forward` maps meshes to neutral ones.
    An unfitted model (`fitted` False) returns its input."""

    def __init__(self, n_coords: int, modes: int, noise: float):
        super().__init__()
        self.noise = noise
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(n_coords))                       # mu (D,)
        self.register_buffer("modes", torch.zeros(modes, n_coords))               # U (k, D), orthonormal rows
        self.register_buffer("mode_var", torch.ones(modes))                       # lambda (k,)
        self.register_buffer("identity_modes", torch.zeros(IDENTITY_MODES, n_coords))  # V (r, D)
        self.register_buffer("identity_var", torch.zeros(IDENTITY_MODES))         # d (r,)

    @torch.no_grad()
    def fit(self, clips) -> None:
        """Fit from (P (T, 478, 3) canonical frames, identity) pairs, one pass in flat memory (a D x D scatter)."""
        D = self.mean.numel()
        centre, second, sums, counts = None, np.zeros((D, D)), {}, {}
        for P, identity in clips:
            X = np.asarray(P, np.float64).reshape(len(P), D)                      # (T, D)
            centre = X.mean(0) if centre is None else centre                      # a fixed centre for precision
            Xc = X - centre
            second += Xc.T @ Xc
            sums[identity] = sums.get(identity, 0.0) + Xc.sum(0)
            counts[identity] = counts.get(identity, 0) + len(X)
        if centre is None:
            raise ValueError("NeutralFace.fit needs at least one clip")
        means = np.stack([sums[k] / counts[k] for k in sums])                     # (I, D) about the centre
        n = np.array([counts[k] for k in sums], np.float64)
        within = (second - (means * n[:, None]).T @ means) / n.sum()              # (D, D) within-identity scatter
        var, vecs = np.linalg.eigh(within)                                        # ascending
        k = self.modes.shape[0]
        self.modes.copy_(torch.from_numpy(vecs[:, ::-1][:, :k].T.copy()))
        self.mode_var.copy_(torch.from_numpy(np.maximum(var[::-1][:k], 1e-12).copy()))
        mu = means.mean(0)
        _, S, Vt = np.linalg.svd(means - mu, full_matrices=False)                 # S (min(I, D),)
        r = min(IDENTITY_MODES, len(S))
        self.identity_modes.zero_()
        self.identity_var.zero_()
        self.identity_modes[:r] = torch.from_numpy(Vt[:r].copy())
        self.identity_var[:r] = torch.from_numpy(S[:r] ** 2 / len(means))
        self.mean.copy_(torch.from_numpy(mu + centre))
        self.fitted.fill_(True)

    def _whiten(self, X: torch.Tensor) -> torch.Tensor:
        """W X for rows X (n, D): (V diag(d) V^T + sigma^2 I)^-1 by the Woodbury identity, V's rows orthonormal."""
        V, d = self.identity_modes, self.identity_var
        return (X - (X @ V.T) * (d / (d + self.noise)) @ V) / self.noise

    def forward(self, P: torch.Tensor) -> torch.Tensor:
        """Meshes (..., 478, 3) canonical -> their neutral faces, same shape: the MAP articulation removed."""
        if not bool(self.fitted) or self.modes.shape[0] == 0:
            return P
        shape = P.shape
        X = P.reshape(-1, self.mean.numel()).to(self.mean.dtype)                  # (n, D)
        U = self.modes
        WU = self._whiten(U)                                                       # (k, D)
        A = U @ WU.T + torch.diag(1.0 / self.mode_var)                             # (k, k)
        c = torch.linalg.solve(A, WU @ (X - self.mean).T)                          # (k, n)
        return (X - c.T @ U).reshape(shape).to(P.dtype)
