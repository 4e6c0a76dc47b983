"""End-effector pose conversions between the `ee_pose_rot6d` action space and what arm SDKs take.

rot6d is the first two columns of the rotation matrix (profile order r11 r21 r31 r12 r22 r32), the
continuous representation the DexVLA/ChatVLA authors predict. A predicted rot6d is not exactly
orthonormal, so it is re-orthonormalised (Gram-Schmidt) before any SDK sees it; a degenerate one is
refused rather than guessed. Quaternions are (x, y, z, w), the order franky and panda-py use.
"""

from __future__ import annotations

import numpy as np

_DEGENERATE = 1e-6


def rot6d_to_matrix(r6: np.ndarray) -> np.ndarray:
    """3x3 rotation from rot6d; ValueError when the two columns are (nearly) parallel or zero."""
    r6 = np.asarray(r6, dtype=np.float64)
    a, b = r6[:3], r6[3:6]
    na = np.linalg.norm(a)
    if na < _DEGENERATE:
        raise ValueError("rot6d first column is zero")
    x = a / na
    b = b - np.dot(x, b) * x
    nb = np.linalg.norm(b)
    if nb < _DEGENERATE:
        raise ValueError("rot6d columns are parallel")
    y = b / nb
    return np.stack([x, y, np.cross(x, y)], axis=1)


def matrix_to_rot6d(r: np.ndarray) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    return np.concatenate([r[:3, 0], r[:3, 1]])


def matrix_to_quat_xyzw(r: np.ndarray) -> np.ndarray:
    """Unit quaternion of a rotation matrix (Shepperd's method: stable for every rotation)."""
    m = np.asarray(r, dtype=np.float64)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    quat = np.asarray(q)
    return quat / np.linalg.norm(quat)


def quat_xyzw_to_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def ee_action_to_transform(action: np.ndarray) -> np.ndarray:
    """4x4 homogeneous target from an `ee_pose_rot6d` action (xyz, rot6d, gripper)."""
    t = np.eye(4)
    t[:3, :3] = rot6d_to_matrix(action[3:9])
    t[:3, 3] = action[:3]
    return t


def transform_to_ee_state(t: np.ndarray, gripper: float) -> np.ndarray:
    """`ee_pose_rot6d` state vector from a 4x4 pose and a gripper width."""
    t = np.asarray(t, dtype=np.float64)
    return np.concatenate([t[:3, 3], matrix_to_rot6d(t[:3, :3]), [gripper]])
