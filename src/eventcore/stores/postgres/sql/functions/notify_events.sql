-- The events_notify trigger (migration 3): after each writing statement on the events table,
-- a NOTIFY on 'eventcore_events_' || (the table's oid), delivered at commit. Sent only while a
-- listening projector's lease lasts (projection_checkpoints.listening_until: renewed every few
-- seconds while it runs, cleared when it stops; a killed or hung process's lease just expires):
-- a transaction that sent NOTIFY commits under one cluster-wide lock, which appends should not
-- pay for when nobody listens. Listeners renew before they read and also poll, so a missed
-- notification only delays them. SECURITY DEFINER: the batch writer's COPY runs as the
-- application role, which must not need rights on the projection tables.
CREATE OR REPLACE FUNCTION {s}.notify_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {s}.projection_checkpoints WHERE listening_until > now()) THEN
        PERFORM pg_notify('eventcore_events_' || TG_RELID::text, '');
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION {s}.notify_events() FROM PUBLIC;
