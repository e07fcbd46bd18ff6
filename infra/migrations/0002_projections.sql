-- Read models projected from the log by projections.postgres. Every row here can be rebuilt:
-- drop the rows and the projection's offsets, replay the topics from offset 0.

-- One row per (sale, SKU), from SaleOpened; SaleClosed sets closed.
CREATE TABLE sales (
    sale_id         text        NOT NULL,
    sku             text        NOT NULL,
    allocation      integer     NOT NULL,
    per_user_limit  integer     NOT NULL,
    per_order_max   integer     NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    closed          boolean     NOT NULL DEFAULT false,
    opened_event_id text        NOT NULL,
    PRIMARY KEY (sale_id, sku)
);

-- Accepted intents only: one order per intent.
CREATE TABLE orders (
    order_id   text        PRIMARY KEY,
    intent_id  text        NOT NULL UNIQUE,
    sale_id    text        NOT NULL,
    sku        text        NOT NULL,
    user_id    text        NOT NULL,
    quantity   integer     NOT NULL,
    decided_at timestamptz NOT NULL,
    sequence   bigint      NOT NULL
);
CREATE INDEX orders_sale_sku ON orders (sale_id, sku);
CREATE INDEX orders_user ON orders (user_id);

-- Every decision, once per intent id: the source for user notifications.
CREATE TABLE intent_outcomes (
    intent_id    text        PRIMARY KEY,
    sale_id      text        NOT NULL,
    sku          text        NOT NULL,
    user_id      text        NOT NULL,
    quantity     integer     NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('accepted', 'rejected')),
    reason       text        NULL,
    detail       text        NOT NULL DEFAULT '',
    order_id     text        NULL,
    remaining    integer     NOT NULL,
    sequence     bigint      NOT NULL,
    decided_at   timestamptz NOT NULL,
    projected_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((outcome = 'accepted') = (order_id IS NOT NULL)),
    CHECK ((outcome = 'rejected') = (reason IS NOT NULL))
);
CREATE INDEX intent_outcomes_user ON intent_outcomes (user_id);
CREATE INDEX intent_outcomes_sale_sku ON intent_outcomes (sale_id, sku);

-- Running totals per (sale, SKU), counted once per intent id; remaining and last_sequence
-- come from the decision with the greatest sequence.
CREATE TABLE sale_counters (
    sale_id            text    NOT NULL,
    sku                text    NOT NULL,
    accepted_intents   bigint  NOT NULL DEFAULT 0,
    accepted_units     bigint  NOT NULL DEFAULT 0,
    rejected_intents   bigint  NOT NULL DEFAULT 0,
    rejected_by_reason jsonb   NOT NULL DEFAULT '{}',
    remaining          integer NOT NULL,
    last_sequence      bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (sale_id, sku)
);
