-- Small tables for the rewrite fixtures: NULLs where a careless rewrite would trip over them,
-- duplicate rows where UNION would collapse them, keys that match nothing.
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, region text, referrer int);
INSERT INTO customers VALUES
    (1, 'ann', 'north', NULL), (2, 'bob', 'south', 1), (3, 'cy', NULL, 1),
    (4, 'di', 'north', 2), (5, 'ed', NULL, NULL), (6, 'fay', 'east', 9);

CREATE TABLE orders (
    id int PRIMARY KEY, cid int, total numeric(10, 2), status text NOT NULL, placed date NOT NULL
);
INSERT INTO orders VALUES
    (1, 1, 10.00, 'paid', '2024-01-01'), (2, 1, NULL, 'open', '2024-01-02'),
    (3, 2, 5.50, 'paid', '2024-01-03'), (4, NULL, 7.00, 'paid', '2024-01-04'),
    (5, 4, 3.25, 'void', '2024-01-05'), (6, 4, 3.25, 'paid', '2024-01-05'),
    (7, 9, 1.00, 'paid', '2024-01-06');

CREATE TABLE blocked (cid int NOT NULL, reason text);
INSERT INTO blocked VALUES (2, 'fraud'), (2, 'dup'), (5, NULL), (7, 'x');

CREATE TABLE maybe_blocked (cid int);
INSERT INTO maybe_blocked VALUES (2), (NULL);

CREATE TABLE items (id int PRIMARY KEY, a int, b int, c text, qty int NOT NULL);
INSERT INTO items VALUES
    (1, 1, 1, 'x', 1), (2, 1, 2, 'y', 2), (3, NULL, 2, 'x', 3), (4, 2, NULL, NULL, 1),
    (5, 1, NULL, 'z', 5), (6, 3, 3, 'x', 1), (7, 1, 1, 'x', 1), (8, NULL, NULL, NULL, 2);
CREATE INDEX ON items (a);
CREATE INDEX ON items (b);
