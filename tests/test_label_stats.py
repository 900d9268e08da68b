"""tools/label_stats.py: the per-pair label counts of a training batch."""

import numpy as np


def test_pair_stats_counts_a_hand_made_batch():
  from conftest import load_tool  # pylint: disable=g-import-not-at-top

  tool = load_tool("label_stats")
  flow = np.zeros((3, 4, 4, 2), np.float32)
  flow[0, 0, 0] = (1.0, 0.0)
  flow[0, 1, 2] = (0.0, -2.0)  # labelled with one component 0: still a label
  flow[1, 3, 3] = (0.5, 0.5)
  flow[2, 2, 2] = (9.0, 9.0)  # the padded pair: never counted
  dense = np.zeros((3, 4, 4), bool)
  dense[0, :2, :2] = True  # holds (0, 0) but not (1, 2)
  dense[1] = True
  kps_valid = np.zeros((3, 5), bool)
  kps_valid[0, :2] = kps_valid[1, :1] = kps_valid[2, :4] = True
  batch = dict(
      flow=flow,
      dense_valid=dense,
      kps_valid=kps_valid,
      pair_valid=np.array([True, True, False]),
  )
  s = tool.pair_stats(batch)
  np.testing.assert_array_equal(s["keypoints"], [2, 1])
  np.testing.assert_array_equal(s["sparse_cells"], [2, 1])
  np.testing.assert_array_equal(s["dense_cells"], [4, 16])
  np.testing.assert_array_equal(s["sparse_in_dense"], [1, 1])
