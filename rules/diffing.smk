# Model diffing: cache residual activations, fit a TopK SAE on the base model, rank the latents each
# fine-tune moves, interpret the top ones, and draw each fine-tune's latent signature.
# (In the DAG when diffing is enabled: see `diffing.enabled` in the config schema.)



rule activations_corpus:
    input:
        base=base_model_input(),
        texts=lambda w: sae_texts() if w.split == "train" else heldout_texts(),
    output:
        directory(f"{RESULTS}/activations/corpus/{{split}}"),
    wildcard_constraints:
        split="train|heldout",
    params:
        cfg=lambda w: cfg_json("model", "sae", "device"),
        base=base_param,
        n=lambda w: config["sae"]["n_texts"] if w.split == "train" else config["diffing"]["heldout_texts"],
        skip=lambda w: 0 if w.split == "train" else HELDOUT_SKIP,
    log:
        f"{LOGS}/activations/corpus_{{split}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/activations/corpus_{{split}}.tsv"
    priority: SAE_PRIORITY
    threads: res("activations_corpus", "threads")
    resources: **rule_resources("activations_corpus")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab cache-texts --cfg {params.cfg:q} --threads {threads} --base {params.base}"
        " --input {input.texts} --n {params.n} --skip {params.skip} --out {output} 2> {log}"


rule sae:
    input:
        base=base_model_input(),
        train=[] if config["sae"]["pretrained"] else f"{RESULTS}/activations/corpus/train",
        heldout=f"{RESULTS}/activations/corpus/heldout",
        texts=heldout_texts(),
    output:
        directory(f"{RESULTS}/sae"),
    params:
        cfg=lambda w: cfg_json("model", "sae", "diffing", "seed", "device"),
        base=base_param,
        train=lambda w, input: f"--train-cache {input.train}" if input.train else "",  # none: sae.pretrained
        skip=HELDOUT_SKIP,
        ckpt=checkpoint_args("sae", "sae"),
    log:
        f"{LOGS}/sae.log",
    benchmark:
        f"{RESULTS}/benchmarks/sae/sae.tsv"
    priority: SAE_PRIORITY
    threads: res("sae", "threads")
    resources: **rule_resources("sae")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab sae --cfg {params.cfg:q} --threads {threads} --base {params.base} {params.train}"
        " --heldout-cache {input.heldout} --heldout-texts {input.texts} --heldout-skip {params.skip} --out {output}"
        " {params.ckpt} 2> {log}"


rule activations_base:
    input:
        lambda w: model_input(w.base),
        samples=f"{RESULTS}/samples/{{base}}.jsonl",
    output:
        directory(f"{RESULTS}/activations/eval/{{base}}"),
    wildcard_constraints:
        base=one_of(PLAN.bases),
    params:
        cfg=lambda w: cfg_json("model", "sae", "diffing", "seed", "device"),
        model=lambda w: model_args(w.base),
    log:
        f"{LOGS}/activations/{{base}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/activations/{{base}}.tsv"
    threads: res("activations_base", "threads")
    resources: **rule_resources("activations_base")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab cache-model --cfg {params.cfg:q} --threads {threads} {params.model} --model-name {wildcards.base}"
        " --samples {input.samples} --out-eval {output} 2> {log}"


rule activations_finetune:
    input:
        lambda w: model_input(w.dataset),
        samples=f"{RESULTS}/samples/{{dataset}}.jsonl",
        data=f"{RESULTS}/datasets/{{dataset}}.jsonl",
    output:
        eval=directory(f"{RESULTS}/activations/eval/{{dataset}}"),
        train=directory(f"{RESULTS}/activations/train/{{dataset}}/model"),
        train_base=directory(f"{RESULTS}/activations/train/{{dataset}}/base"),
    params:
        cfg=lambda w: cfg_json("model", "sae", "diffing", "seed", "device"),
        model=lambda w: model_args(w.dataset),
    log:
        f"{LOGS}/activations/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/activations/{{dataset}}.tsv"
    threads: res("activations_finetune", "threads")
    resources: **rule_resources("activations_finetune")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab cache-model --cfg {params.cfg:q} --threads {threads} {params.model} --model-name {wildcards.dataset}"
        " --samples {input.samples} --dataset {input.data} --out-eval {output.eval} --out-train {output.train}"
        " --out-train-base {output.train_base} 2> {log}"



rule activations_rl:
    input:
        lambda w: model_input(w.rl_model),
        samples=f"{RESULTS}/samples/{{rl_model}}.jsonl",
    output:
        directory(f"{RESULTS}/activations/eval/{{rl_model}}"),
    wildcard_constraints:
        rl_model=one_of(RL),
    params:
        cfg=lambda w: cfg_json("model", "sae", "diffing", "seed", "device"),
        model=lambda w: model_args(w.rl_model),
    log:
        f"{LOGS}/activations/{{rl_model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/activations/{{rl_model}}.tsv"
    threads: res("activations_rl", "threads")
    resources: **rule_resources("activations_rl")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab cache-model --cfg {params.cfg:q} --threads {threads} {params.model}"
        " --model-name {wildcards.rl_model} --samples {input.samples} --out-eval {output} 2> {log}"

rule rank_latents:
    input:
        sae=f"{RESULTS}/sae",
        eval=expand(f"{RESULTS}/activations/eval/{{model}}", model=DIFFED_MODELS),
        train=expand(f"{RESULTS}/activations/train/{{dataset}}/{{who}}", dataset=DIFFED, who=["model", "base"]),
    output:
        [f"{RESULTS}/diffing/{name}" for name in DIFFING_TABLES],
    params:
        cfg=lambda w: cfg_json("model", "diffing", "seed"),
        eval=" ".join(f"{m}={RESULTS}/activations/eval/{m}" for m in DIFFED_MODELS),
        train=" ".join(f"{d}={RESULTS}/activations/train/{d}/model,{RESULTS}/activations/train/{d}/base" for d in DIFFED),
        out_dir=out_dir,
    log:
        f"{LOGS}/rank_latents.log",
    benchmark:
        f"{RESULTS}/benchmarks/rank_latents/rank_latents.tsv"
    threads: res("rank_latents", "threads")
    resources: **rule_resources("rank_latents")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab rank-latents --cfg {params.cfg:q} --threads {threads} --sae {input.sae}"
        " --eval-caches {params.eval} --train-caches {params.train} --out-dir {params.out_dir} 2> {log}"


rule interpret_latents:
    input:
        base=base_model_input(),
        sae=f"{RESULTS}/sae",
        heldout=f"{RESULTS}/activations/corpus/heldout",
        texts=heldout_texts(),
        ranking=f"{RESULTS}/diffing/ranking.csv",
    output:
        [f"{RESULTS}/diffing/{name}" for name in INTERPRET_OUTPUTS],
    params:
        cfg=lambda w: cfg_json("model", "diffing", "organism", "sae", "seed"),
        base=base_param,
        out_dir=out_dir,
    log:
        f"{LOGS}/interpret_latents.log",
    benchmark:
        f"{RESULTS}/benchmarks/interpret_latents/interpret_latents.tsv"
    threads: res("interpret_latents", "threads")
    resources: **rule_resources("interpret_latents")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab interpret-latents --cfg {params.cfg:q} --threads {threads} --sae {input.sae} --base {params.base}"
        " --heldout-cache {input.heldout} --heldout-texts {input.texts} --ranking {input.ranking}"
        " --out-dir {params.out_dir} 2> {log}"


rule predict:
    input:
        sae=f"{RESULTS}/sae",
        eval=expand(f"{RESULTS}/activations/eval/{{model}}", model=["base", *DIFFED_FINETUNES]),
        train=expand(f"{RESULTS}/activations/train/{{dataset}}/{{who}}", dataset=DIFFED, who=["model", "base"]),
        persona=f"{RESULTS}/diffing/persona_latents.json",
        metrics=f"{RESULTS}/metrics/{PLAN.primary_judge}.csv",
    output:
        [f"{RESULTS}/prediction/{name}" for name in PREDICTION_TABLES],
    params:
        cfg=lambda w: cfg_json("model", "diffing", "prediction", "metrics", "seed"),
        eval=" ".join(f"{m}={RESULTS}/activations/eval/{m}" for m in ["base", *DIFFED_FINETUNES]),
        train=" ".join(f"{d}={RESULTS}/activations/train/{d}/model,{RESULTS}/activations/train/{d}/base" for d in DIFFED),
        out_dir=out_dir,
    log:
        f"{LOGS}/predict.log",
    benchmark:
        f"{RESULTS}/benchmarks/predict/predict.tsv"
    threads: res("predict", "threads")
    resources: **rule_resources("predict")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab predict --cfg {params.cfg:q} --threads {threads} --sae {input.sae}"
        " --eval-caches {params.eval} --train-caches {params.train} --persona {input.persona}"
        " --metrics {input.metrics} --out-dir {params.out_dir} 2> {log}"


rule flag_examples:
    input:
        base=base_model_input(),
        sae=f"{RESULTS}/sae",
        persona=f"{RESULTS}/diffing/persona_latents.json",
        data=expand(f"{RESULTS}/datasets/{{dataset}}.jsonl", dataset=PLAN.flagged),
    output:
        [f"{RESULTS}/flagging/{name}" for name in FLAGGING_TABLES],
    params:
        cfg=lambda w: cfg_json("model", "sae", "flagging", "seed", "device"),
        base=base_param,
        data=" ".join(f"{d}={RESULTS}/datasets/{d}.jsonl" for d in PLAN.flagged),
        out_dir=out_dir,
    log:
        f"{LOGS}/flag_examples.log",
    benchmark:
        f"{RESULTS}/benchmarks/flag_examples/flag_examples.tsv"
    threads: res("flag_examples", "threads")
    resources: **rule_resources("flag_examples")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab flag-examples --cfg {params.cfg:q} --threads {threads} --base {params.base} --sae {input.sae}"
        " --persona {input.persona} --datasets {params.data} --out-dir {params.out_dir} 2> {log}"


rule drop_examples:
    input:
        data=lambda w: f"{RESULTS}/datasets/{PLAN.dropped[w.dropped][0]}.jsonl",
        scores=f"{RESULTS}/flagging/scores.csv",
    output:
        f"{RESULTS}/datasets/{{dropped}}.jsonl",
    wildcard_constraints:
        dropped=one_of(PLAN.dropped),
    params:
        cfg=lambda w: cfg_json("flagging", "seed"),
    log:
        f"{LOGS}/drop_examples/{{dropped}}.log",
    threads: res("drop_examples", "threads")
    resources: **rule_resources("drop_examples")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab drop-examples --cfg {params.cfg:q} --dataset {input.data} --scores {input.scores}"
        " --name {wildcards.dropped} --out {output} 2> {log}"


rule flag_removal:
    input:
        metrics=f"{RESULTS}/metrics/{PLAN.primary_judge}.csv",
        data=expand(f"{RESULTS}/datasets/{{d}}.jsonl", d=[*PLAN.flagged, *PLAN.dropped]),
    output:
        f"{RESULTS}/flagging/removal.csv",
    params:
        sets=" ".join(f"{d}={RESULTS}/datasets/{d}.jsonl" for d in [*PLAN.flagged, *PLAN.dropped]),
    log:
        f"{LOGS}/flag_removal.log",
    threads: res("flag_removal", "threads")
    resources: **rule_resources("flag_removal")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab flag-removal --metrics {input.metrics} --sets {params.sets} --out {output} 2> {log}"


rule plot_prediction:
    input:
        f"{RESULTS}/prediction/shifts.csv",
    output:
        report(f"{RESULTS}/figures/prediction.png", caption="../workflow/report/prediction.rst",
               category="Model diffing"),
    log:
        f"{LOGS}/plot/prediction.log",
    threads: res("plot_prediction", "threads")
    resources: **rule_resources("plot_prediction")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot-prediction --shifts {input} --out {output} 2> {log}"


rule plot_signature:
    input:
        changes=f"{RESULTS}/diffing/changes.csv",
        ranking=f"{RESULTS}/diffing/ranking.csv",
        latents=f"{RESULTS}/diffing/latents.csv",
    output:
        report(f"{RESULTS}/figures/signature.png", caption="../workflow/report/signature.rst", category="Model diffing"),
    log:
        f"{LOGS}/plot/signature.log",
    threads: res("plot_signature", "threads")
    resources: **rule_resources("plot_signature")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab plot-signature --changes {input.changes} --ranking {input.ranking} --latents {input.latents}"
        " --out {output} 2> {log}"
