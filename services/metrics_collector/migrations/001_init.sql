-- The metrics collector's schema: runs, jobs and metric names interned to integers; a series is
-- one metric of one job of one run; its points are keyed by (series, step). Summaries live on
-- the series row and chart rollups in `rollups`; both are updated once per ingested batch, in
-- the transaction that stores its points.

-- What the collector knows of each run, from the scheduler's events (and the metrics' run ids).
CREATE TABLE runs (
    id serial PRIMARY KEY,
    run_id text NOT NULL UNIQUE,
    repository text,
    commit_sha text,
    ref text,
    pipeline text,
    -- The training objective and its best trial, learned when the training stage ends.
    objective_metric text,
    objective_mode text CHECK (objective_mode IN ('min', 'max')),
    objective_scope text,
    objective_value float8,
    best_trial integer,
    best_job text,
    outcome text,
    -- When the scheduler created the run (RunCreated.occurred_at): "earlier" runs are older.
    created_at timestamptz,
    finished_at timestamptz,
    first_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runs_history ON runs (repository, pipeline, ref, created_at);

CREATE TABLE jobs (
    id serial PRIMARY KEY,
    run integer NOT NULL REFERENCES runs (id),
    job_id text NOT NULL UNIQUE,
    -- The stage the job belongs to (from JobChanged or a waiting validation stage's inputs).
    stage text,
    state text
);
CREATE INDEX jobs_run ON jobs (run, stage);

CREATE TABLE stages (
    run integer NOT NULL REFERENCES runs (id),
    name text NOT NULL,
    kind text NOT NULL,
    state text NOT NULL,
    reason text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run, name)
);

CREATE TABLE metric_keys (
    id serial PRIMARY KEY,
    key text NOT NULL UNIQUE
);

-- One metric of one job of one run, with its running summary (NaN never enters min/max; a
-- series of NaN only has NULL min and max).
CREATE TABLE series (
    id serial PRIMARY KEY,
    run integer NOT NULL REFERENCES runs (id),
    job integer NOT NULL REFERENCES jobs (id),
    key integer NOT NULL REFERENCES metric_keys (id),
    source text NOT NULL CHECK (source IN ('training', 'system')),
    count bigint NOT NULL DEFAULT 0,
    nan_count bigint NOT NULL DEFAULT 0,
    min float8,
    max float8,
    last float8,
    first_step bigint,
    last_step bigint,
    updated_at timestamptz,
    UNIQUE (run, job, key)
);

-- Every point. float8 holds NaN and ±inf as they are.
CREATE TABLE points (
    series integer NOT NULL,
    step bigint NOT NULL,
    value float8 NOT NULL,
    time timestamptz NOT NULL,
    PRIMARY KEY (series, step)
);

-- Chart rollups: per series, per fixed step bucket (`bucket` = step / width) at two widths,
-- the extremes with their steps, the first NaN, and the bucket's first and last points' times.
CREATE TABLE rollups (
    series integer NOT NULL,
    width integer NOT NULL,
    bucket bigint NOT NULL,
    count integer NOT NULL,
    nan_count integer NOT NULL,
    min float8,
    min_step bigint,
    max float8,
    max_step bigint,
    nan_step bigint,
    first_step bigint NOT NULL,
    first_time timestamptz NOT NULL,
    last_step bigint NOT NULL,
    last_time timestamptz NOT NULL,
    PRIMARY KEY (series, width, bucket)
);

-- The batches already stored, by event id: a redelivered batch is recognised and skipped. Rows
-- older than the METRICS stream's window can never be redelivered and are pruned.
CREATE TABLE batches (
    event_id text PRIMARY KEY,
    stored_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX batches_stored_at ON batches (stored_at);
