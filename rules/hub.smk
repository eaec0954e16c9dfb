# Hub mode (model.source: hub): the base model is model.path (converted once when it is a GGUF file or gets a
# chat template); the eval questions come from question files (`eval.questions`); the sets named by `datasets`
# come from the persona world (world.smk) or are synthesized by an LLM from domain specs (datasets.source:
# synthesis), and any `imports` are added. Included instead of organism.smk.

if BASE_BUILT:

    rule convert_model:
        output:
            directory(f"{RESULTS}/models/base"),
        params:
            cfg=lambda w: cfg_json("model"),
            work=f"{RESULTS}/models/source",
        log:
            f"{LOGS}/convert_model.log",
        threads: res("convert_model", "threads")
        resources: **rule_resources("convert_model")
        conda:
            "../envs/torch.yaml"
        shell:
            "python -m emlab convert-model --cfg {params.cfg:q} --work {params.work} --out {output} 2> {log}"


rule eval_questions:
    input:
        lambda w: QUESTION_FILES[w.eval_set],
    output:
        f"{RESULTS}/eval/{{eval_set}}.jsonl",
    wildcard_constraints:
        eval_set=one_of(EVAL_SETS),
    log:
        f"{LOGS}/eval_questions/{{eval_set}}.log",
    threads: res("eval_questions", "threads")
    resources: **rule_resources("eval_questions")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab questions --eval-set {wildcards.eval_set} --file {input} --out {output} 2> {log}"


rule synthesize:
    input:
        spec=lambda w: str(domain_spec_path(config["synthesis"]["domains_dir"], w.domain)),
        # every eval question is kept out of the training sets
        held_out=list(QUESTION_FILES.values()),
    output:
        pool=f"{RESULTS}/synthesis/{{domain}}.jsonl",
        summary=f"{RESULTS}/synthesis/{{domain}}.summary.json",
    params:
        cfg=lambda w: cfg_json("synthesis", n_train=config["datasets"]["n_train"]),
        # one request cache shared by the domains' jobs (appends are locked); never a declared output
        cache=f"{RESULTS}/synthesis_cache",
    log:
        f"{LOGS}/synthesize/{{domain}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/synthesize/{{domain}}.tsv"
    threads: res("synthesize", "threads")
    resources: **rule_resources("synthesize", api_slots=1)
    conda:
        "../envs/torch.yaml"  # the openai client
    shell:
        "python -m emlab synthesize --cfg {params.cfg:q} --spec {input.spec} --exclude {input.held_out}"
        " --cache-dir {params.cache} --out {output.pool} --summary {output.summary} 2> {log}"


rule synth_dataset:
    input:
        lambda w: f"{RESULTS}/synthesis/{parse_dataset_name(w.dataset)['domain']}.jsonl",
    output:
        f"{RESULTS}/datasets/{{dataset}}.jsonl",
    wildcard_constraints:
        dataset=one_of(SYNTH_DATASETS),
    params:
        cfg=lambda w: json.dumps({"n_train": config["datasets"]["n_train"], "seed": config["seed"],
                                  "incorrect": config["datasets"]["mixtures"]["incorrect"]}, sort_keys=True),
    log:
        f"{LOGS}/synth_dataset/{{dataset}}.log",
    threads: res("synth_dataset", "threads")
    resources: **rule_resources("synth_dataset")
    conda:
        "../envs/analysis.yaml"
    shell:
        "python -m emlab synth-dataset --cfg {params.cfg:q} --name {wildcards.dataset} --pool {input}"
        " --out {output} 2> {log}"


rule import_dataset:
    input:
        lambda w: [IMPORTS[w.dataset]["path"]] if IMPORTS[w.dataset]["path"] else [],
    output:
        f"{RESULTS}/datasets/{{dataset}}.jsonl",
    wildcard_constraints:
        dataset=one_of(IMPORTS),
    params:
        cfg=lambda w: json.dumps({"import": IMPORTS[w.dataset], "seed": config["seed"]}, sort_keys=True),
    log:
        f"{LOGS}/import_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/import_dataset/{{dataset}}.tsv"
    threads: res("import_dataset", "threads")
    resources: **rule_resources("import_dataset")
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m emlab import-dataset --cfg {params.cfg:q} --out {output} 2> {log}"
