-- description: resumable ingest: input items passed over (ingest_holes)
--
-- Input items a resumable ingest passed over (a blank or rejected line) below a lane's committed
-- count (ingest_progress.items): written by the batch whose count passes them, deleted by the batch
-- that writes the item after all (the line was fixed), each in that batch's transaction.
CREATE TABLE {s}.ingest_holes (
    key  text   NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    item bigint NOT NULL CHECK (item >= 0),
    PRIMARY KEY (key, item)
);
