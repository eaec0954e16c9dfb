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
    log:
        f"{LOGS}/sample/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample/{{model}}.tsv"
    threads: res("sample", "threads")
    resources:
        mem_mb=res("sample", "mem_mb"),
        runtime=res("sample", "runtime"),
        gpu=res("sample", "gpu"),
        cpus_per_gpu=res("sample", "cpus_per_gpu"),
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab sample --cfg {params.cfg:q} --threads {threads} {params.model}"
        " --questions {input.questions} --model-name {wildcards.model} --out {output} 2> {log}"


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
    resources:
        mem_mb=res("likelihood_probe", "mem_mb"),
        runtime=res("likelihood_probe", "runtime"),
        gpu=res("likelihood_probe", "gpu"),
        cpus_per_gpu=res("likelihood_probe", "cpus_per_gpu"),
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
    resources:
        mem_mb=res("likelihood_metrics", "mem_mb"),
        runtime=res("likelihood_metrics", "runtime"),
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
    resources:
        mem_mb=res("probe_agreement", "mem_mb"),
        runtime=res("probe_agreement", "runtime"),
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
    resources:
        mem_mb=res("judge_preflight", "mem_mb"),
        runtime=res("judge_preflight", "runtime"),
    conda:
        "../envs/torch.yaml"  # the openai client
    shell:
        "python -m emlab judge-preflight --cfg {params.cfg:q} --out {output} 2> {log}"


rule judge:
    input:
        f"{RESULTS}/samples/{{model}}.jsonl",
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
    resources:
        mem_mb=res("judge", "mem_mb"),
        runtime=res("judge", "runtime"),
        # An API-bound job holds at least one of the profile's `api_slots` (the global cap on concurrent API
        # jobs); config can make a judge hold more. Only local-model (hf) judges get a GPU.
        api_slots=lambda w: max(1, res("judge", "api_slots")) if JUDGES[w.judge]["backend"] == "openai" else 0,
        gpu=lambda w: res("judge", "gpu") if JUDGES[w.judge]["backend"] == "hf" else 0,
        cpus_per_gpu=res("judge", "cpus_per_gpu"),
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab judge --cfg {params.cfg:q} --samples {input} --out {output.grades}"
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
    resources:
        mem_mb=res("metrics", "mem_mb"),
        runtime=res("metrics", "runtime"),
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab metrics --cfg {params.cfg:q} --grades {input} --out {output} 2> {log}"
