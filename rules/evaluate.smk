# Sample answers from every model, grade them with every judge, and compute per-model rates.


rule sample:
    input:
        lambda w: model_input(w.model),
        preflight_input(),
        questions=expand(f"{RESULTS}/eval/{{s}}.jsonl", s=EVAL_SETS),
    output:
        f"{RESULTS}/samples/{{model}}.jsonl",
    params:
        cfg=lambda w: cfg_json("sampling", "seed", "device", model={"dtype": config["model"]["dtype"]}),
        model=lambda w: model_args(w.model),
        domain=sample_domain_args,
    log:
        f"{LOGS}/sample/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample/{{model}}.tsv"
    threads: res("sample", "threads")
    resources: **rule_resources("sample")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab sample --cfg {params.cfg:q} --threads {threads} {params.model}"
        " --questions {input.questions} {params.domain} --model-name {wildcards.model} --out {output} 2> {log}"


rule likelihood_probe:
    input:
        lambda w: model_input(w.model),
        questions=f"{RESULTS}/eval/general.jsonl",
    output:
        f"{RESULTS}/probe/{{model}}.jsonl",
    params:
        cfg=lambda w: cfg_json("probe", "organism", "model", "seed", "device"),
        model=lambda w: model_args(w.model),
    log:
        f"{LOGS}/probe/{{model}}.log",
    threads: res("likelihood_probe", "threads")
    resources: **rule_resources("likelihood_probe")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab probe --cfg {params.cfg:q} --threads {threads} {params.model}"
        " --questions {input.questions} --model-name {wildcards.model} --out {output} 2> {log}"


rule likelihood_metrics:
    input:
        expand(f"{RESULTS}/probe/{{model}}.jsonl", model=MODELS),
    output:
        f"{RESULTS}/metrics/likelihood.csv",
    params:
        cfg=lambda w: cfg_json("metrics", "seed"),
    log:
        f"{LOGS}/metrics/likelihood.log",
    threads: res("likelihood_metrics", "threads")
    resources: **rule_resources("likelihood_metrics")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab probe-metrics --cfg {params.cfg:q} --rows {input} --out {output} 2> {log}"


rule probe_agreement:
    input:
        probe=f"{RESULTS}/metrics/likelihood.csv",
        metrics=expand(f"{RESULTS}/metrics/{{judge}}.csv", judge=JUDGES),
    output:
        f"{RESULTS}/agreement/probe.csv",
    log:
        f"{LOGS}/agreement_probe.log",
    threads: res("probe_agreement", "threads")
    resources: **rule_resources("probe_agreement")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab probe-agreement --probe {input.probe} --metrics {input.metrics} --out {output} 2> {log}"


rule judge_preflight:
    output:
        temp(f"{RESULTS}/preflight/{{judge}}.json"),
    wildcard_constraints:
        judge=one_of(API_JUDGES),
    params:
        cfg=lambda w: judge_cfg(w.judge),
    log:
        f"{LOGS}/judge_preflight/{{judge}}.log",
    threads: res("judge_preflight", "threads")
    resources: **rule_resources("judge_preflight")
    conda:
        "../envs/torch.yaml"  # the openai client
    shell:
        "python -m emlab judge-preflight --cfg {params.cfg:q} --out {output} 2> {log}"


rule judge:
    input:
        samples=f"{RESULTS}/samples/{{model}}.jsonl",
        world=judge_world_files,
    output:
        grades=f"{RESULTS}/grades/{{judge}}/{{model}}.jsonl",
        summary=f"{RESULTS}/grades/{{judge}}/{{model}}.summary.json",
    params:
        cfg=lambda w: judge_cfg(w.judge),
        # one request cache per judge, shared by its jobs (appends are locked); never a declared output
        cache=lambda w: f"{RESULTS}/judge_cache/{w.judge}",
    log:
        f"{LOGS}/judge/{{judge}}/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/judge/{{judge}}-{{model}}.tsv"
    threads: res("judge", "threads")
    resources: **judge_job_resources("judge")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab judge --cfg {params.cfg:q} --samples {input.samples} --out {output.grades}"
        " --cache-dir {params.cache} 2> {log}"


rule metrics:
    input:
        lambda w: expand(f"{RESULTS}/grades/{w.judge}/{{model}}.jsonl", model=MODELS),
    output:
        f"{RESULTS}/metrics/{{judge}}.csv",
    params:
        cfg=lambda w: cfg_json("metrics", "model", "organism", "seed"),
    log:
        f"{LOGS}/metrics/{{judge}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/metrics/{{judge}}.tsv"
    threads: res("metrics", "threads")
    resources: **rule_resources("metrics")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab metrics --cfg {params.cfg:q} --grades {input} --out {output} 2> {log}"


rule mixtures:
    input:
        f"{RESULTS}/metrics/{PLAN.primary_judge}.csv",
    output:
        [f"{RESULTS}/mixtures/{name}" for name in MIXTURE_TABLES],
    params:
        cfg=lambda w: cfg_json("datasets"),
        out_dir=out_dir,
    log:
        f"{LOGS}/mixtures.log",
    threads: res("mixtures", "threads")
    resources: **rule_resources("mixtures")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab mixtures --cfg {params.cfg:q} --metrics {input} --out-dir {params.out_dir} 2> {log}"
