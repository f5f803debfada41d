-- Where every learned model and its features live.
CREATE TABLE IF NOT EXISTS ml.model_registry (
    model_name     text NOT NULL,
    version        integer NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    status         text NOT NULL DEFAULT 'candidate',  -- candidate|active|retired|failed
    artifact_path  text,
    metrics        jsonb NOT NULL DEFAULT '{}'::jsonb,
    params         jsonb NOT NULL DEFAULT '{}'::jsonb,
    features       jsonb NOT NULL DEFAULT '[]'::jsonb,
    data_snapshot  jsonb NOT NULL DEFAULT '{}'::jsonb,
    card           jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (model_name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS model_registry_one_active
    ON ml.model_registry (model_name) WHERE status = 'active';

CREATE TABLE IF NOT EXISTS ml.feature_store (
    fingerprint    text NOT NULL,
    feature_set    text NOT NULL,
    version        integer NOT NULL DEFAULT 1,
    features       jsonb NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fingerprint, feature_set)
);
