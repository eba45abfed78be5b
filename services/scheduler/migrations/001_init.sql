-- Runs, their stages and jobs (trials are training jobs with an index), the agents jobs run on,
-- and the leadership term that fences every change the active replica makes.

CREATE TABLE leadership (
    id        integer PRIMARY KEY CHECK (id = 1),
    term      bigint NOT NULL,
    holder    text NOT NULL,
    since     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO leadership (id, term, holder) VALUES (1, 0, '');

CREATE TABLE runs (
    id                 text PRIMARY KEY,
    -- The pipeline.requested event it came from: a redelivered request creates nothing twice.
    request_event_id   text NOT NULL UNIQUE,
    repository         text NOT NULL,
    commit_sha         text NOT NULL,
    ref                text NOT NULL DEFAULT '',
    pipeline           text,
    pusher             text,
    spec               jsonb NOT NULL,
    state              text NOT NULL,
    reason             text,
    best_trial         integer,
    cancel_requested_by text,
    cancel_reason      text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);
CREATE INDEX runs_newest ON runs (created_at DESC, id);
CREATE INDEX runs_active ON runs (created_at) WHERE state = 'running';

CREATE TABLE stages (
    run_id       text NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name         text NOT NULL,
    position     integer NOT NULL,
    kind         text NOT NULL,
    needs        text[] NOT NULL DEFAULT '{}',
    -- The service a waiting stage waits for (data_versioner, packager, traffic_router...).
    service      text,
    state        text NOT NULL DEFAULT 'pending',
    reason       text,
    timeout_s    double precision,
    -- What the stage was given and produced: datasets' versions, the best trial, gate results.
    inputs       jsonb NOT NULL DEFAULT '{}',
    outputs      jsonb NOT NULL DEFAULT '{}',
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE jobs (
    id                  text PRIMARY KEY,
    run_id              text NOT NULL,
    stage               text NOT NULL,
    kind                text NOT NULL,
    name                text NOT NULL,
    trial               integer,
    hparams             jsonb NOT NULL DEFAULT '{}',
    state               text NOT NULL DEFAULT 'pending',
    reason              text,
    project             text NOT NULL,
    priority            integer NOT NULL DEFAULT 0,
    nodes               integer NOT NULL,
    gpus_per_node       integer NOT NULL,
    millicores          integer NOT NULL DEFAULT 0,
    memory_mib          integer NOT NULL DEFAULT 0,
    capability          text,
    attempt             integer NOT NULL DEFAULT 0,
    -- Attempts that failed or lost their agent; a job is retried while failures <= max_retries.
    failures            integer NOT NULL DEFAULT 0,
    max_retries         integer NOT NULL DEFAULT 0,
    excluded_agents     text[] NOT NULL DEFAULT '{}',
    -- JobWork as sent to agents, less the per-node fields.
    work                jsonb NOT NULL,
    timeout_s           double precision,
    runtime_estimate_s  double precision,
    queued_at           timestamptz,
    assigned_at         timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    exit_code           integer,
    metrics             jsonb NOT NULL DEFAULT '{}',
    objective           double precision,
    artifacts           jsonb NOT NULL DEFAULT '[]',
    stop_requested_at   timestamptz,
    stop_requested_by   text,
    stop_reason         text,
    stopped_by          text,
    FOREIGN KEY (run_id, stage) REFERENCES stages (run_id, name) ON DELETE CASCADE
);
CREATE INDEX jobs_of_run ON jobs (run_id, stage, trial);
CREATE INDEX jobs_live ON jobs (state) WHERE state IN ('queued', 'assigned', 'running');
CREATE INDEX jobs_history ON jobs (project, name, finished_at DESC) WHERE state = 'succeeded';

-- Where each node of each attempt of a job went, and what became of it.
CREATE TABLE job_nodes (
    job_id       text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    rank         integer NOT NULL,
    agent_id     text NOT NULL,
    gpus         integer[] NOT NULL DEFAULT '{}',
    state        text NOT NULL DEFAULT 'assigned',
    exit_code    integer,
    reason       text,
    accepted_at  timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (job_id, attempt, rank)
);
CREATE INDEX job_nodes_on_agent ON job_nodes (agent_id) WHERE finished_at IS NULL;

CREATE TABLE agents (
    id             text PRIMARY KEY,
    hostname       text NOT NULL,
    simulated      boolean NOT NULL DEFAULT false,
    inventory      jsonb NOT NULL,
    state          text NOT NULL DEFAULT 'alive',
    registered_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    lost_at        timestamptz
);
