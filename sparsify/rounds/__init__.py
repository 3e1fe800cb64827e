"""Round hooks: the steps of a prune round around the ranking (`base`: RoundHook, PruneRound;
`hooks`: regroup, permute, taylor saliency, rewind), and the algorithms they run (`permute` +
`permsearch`, `regroup`, `rewind`).
"""
