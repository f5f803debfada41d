-- Query clusters and workload forecasts (issue 9): models/clusters.py and models/forecast.py.

-- The cluster of each template under each version of the "clusters" model. Readers use the
-- active version (ml.model_registry); 'online' rows are templates first seen after training,
-- assigned to the nearest centroid.
CREATE TABLE IF NOT EXISTS metadata.query_clusters (
    model_version  integer NOT NULL,
    fingerprint    text NOT NULL,
    cluster        integer NOT NULL,
    distance       double precision,
    source         text NOT NULL DEFAULT 'train' CHECK (source IN ('train', 'online')),
    assigned_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, fingerprint)
);
CREATE INDEX IF NOT EXISTS query_clusters_fingerprint ON metadata.query_clusters (fingerprint);

-- Forecast arrivals per 5-minute window, per cluster ('0', '1', ...) and 'total'. One forecast
-- run shares made_at (real time); origin and window_start are on the logged clock (simulated
-- time when the workload simulator's clock runs). horizon '1h' = leads 1-12, '6h' = 13-72.
CREATE TABLE IF NOT EXISTS metadata.workload_forecasts (
    made_at        timestamptz NOT NULL,
    model_version  integer NOT NULL,
    origin         timestamptz NOT NULL,
    cluster        text NOT NULL,
    horizon        text NOT NULL CHECK (horizon IN ('1h', '6h')),
    lead           smallint NOT NULL CHECK (lead BETWEEN 1 AND 72),
    window_start   timestamptz NOT NULL,
    predicted      double precision NOT NULL,
    lower          double precision NOT NULL,
    upper          double precision NOT NULL,
    model          text NOT NULL,
    PRIMARY KEY (made_at, model_version, cluster, lead)
);
CREATE INDEX IF NOT EXISTS workload_forecasts_window
    ON metadata.workload_forecasts (window_start, cluster);
CREATE INDEX IF NOT EXISTS workload_forecasts_version
    ON metadata.workload_forecasts (model_version, made_at);
