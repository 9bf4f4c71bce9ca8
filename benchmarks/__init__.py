"""phf's benchmarks: throughput on this machine, beside the package (not shipped in its wheel), run by `phf bench`.

    bench.py            scoring, training and sampling on the CPU (`phf bench [score|train|sample]`)
    bench_pipeline.py   the scoring pipeline on large generated corpora (`phf bench score --large`), free of torch
    reference_sampler.py  the sampler before phf.model.decoding, measured beside the current one
    paper_shape.py      the paper's 124M shape (or a tiny one), the measured matmul peak, the ratio table
    paper_train.py      phf's training beside a plain PyTorch loop and transformers' Trainer (`--device`)
    paper_sample.py     phf's sampler beside transformers' generate (`--device`)
    gpu_check.sh        both on a bare GPU machine, in one command, into one JSON
"""
