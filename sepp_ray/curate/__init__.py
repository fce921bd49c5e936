"""`sepp curate`: review mined pairs in the browser, keep the good ones, train on them.

The semantic-pairs dataset of arXiv 2510.08722 was curated by hand; this package makes that
step a web page over the output of `sepp mine`: decisions go to an append-only log beside the
pairs, and the accepted pairs are exported as the ``pairs.curated`` table of `sepp pretrain`.
"""
