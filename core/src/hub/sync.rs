//! Pointer moves (receipts) and `sync` backlogs stitched with live messages.

use super::*;

impl Hub {
    pub(super) fn complete_pointer(
        &self,
        origin: Origin,
        user: &UserId,
        chat: &ChatId,
        result: EngineResult,
        tickets: &mut Vec<(u64, TicketOutcome)>,
    ) {
        match result {
            EngineResult::PointerMoved {
                delivered,
                read,
                moved_delivered,
                moved_read,
            } => {
                if let Some((_, members)) = self.members.get(chat) {
                    if moved_delivered {
                        let f =
                            protocol::encode_receipt(chat, user, PointerKind::Delivered, delivered);
                        self.broadcast(&members, Some(user), &f);
                        self.to_other_nodes(chat, user, f);
                    }
                    if moved_read {
                        let f = protocol::encode_receipt(chat, user, PointerKind::Read, read);
                        self.broadcast(&members, Some(user), &f);
                        self.to_other_nodes(chat, user, f);
                    }
                }
                if let Origin::Ticket(t) = origin {
                    tickets.push((t, TicketOutcome::Pointer { delivered, read }));
                }
            }
            other => {
                let error = match other {
                    EngineResult::Failed(e) => e,
                    _ => FrameError::new(
                        ErrorCode::Internal,
                        "engine answered a pointer with another kind of result",
                    ),
                };
                match origin {
                    Origin::Conn(c) => self.push_to(c, Outgoing::Frame(error.encode())),
                    Origin::Ticket(t) => tickets.push((t, TicketOutcome::Failed(error))),
                }
            }
        }
    }

    /// The engine's answer to a `sync` event: nothing now when it streams the backlog
    /// (`Deferred`), or an error that ends the sync.
    pub(super) fn complete_sync(
        &self,
        conn: ConnId,
        reference: Option<String>,
        result: EngineResult,
    ) {
        match result {
            EngineResult::Deferred => {}
            EngineResult::Failed(e) => self.sync_failed(conn, reference.as_deref(), e),
            _ => self.sync_failed(
                conn,
                reference.as_deref(),
                FrameError::new(
                    ErrorCode::Internal,
                    "engine answered a sync with another kind of result",
                ),
            ),
        }
    }

    /// Queues one page of a `sync` backlog on the connection, whole or not at all: only
    /// while it fits in half of its queue (the backlog counts against `queue_capacity`, so
    /// a returning user's history is never held in memory beyond that, and live messages
    /// keep the other half).
    pub fn sync_rows(&self, conn: ConnId, rows: &[BacklogRow]) -> SyncPush {
        let Some(c) = self.registry.get(conn) else {
            return SyncPush::Closed;
        };
        if c.is_closing() {
            return SyncPush::Closed;
        }
        if !c.has_room_for_backlog(rows.len()) {
            return SyncPush::Full;
        }
        let items = rows.iter().map(|row| Outgoing::Backlog {
            chat: ChatId::from(row.chat_id.as_str()),
            seq: row.seq,
            frame: protocol::encode_msg(&row.message()),
        });
        metrics::add(&self.counters.sync_rows, rows.len() as u64);
        match c.push_all(items) {
            Push::Queued => SyncPush::Queued,
            Push::Overflow | Push::Closed => SyncPush::Closed,
        }
    }

    /// Ends a `sync` answer with its `synced` frame (each chat's last seq as read).
    pub fn sync_end(&self, conn: ConnId, reference: Option<&str>, chats: &[(String, u64)]) {
        let frame = protocol::encode_synced(chats.iter().map(|(c, s)| (c.as_str(), *s)), reference);
        self.push_to(conn, Outgoing::SyncEnd { frame, ok: true });
    }

    /// Ends a `sync` answer with an error (what was streamed stays written; a retry
    /// repeats none of it).
    pub fn sync_failed(&self, conn: ConnId, reference: Option<&str>, error: FrameError) {
        let frame = error.with_ref(reference.map(str::to_owned)).encode();
        self.push_to(conn, Outgoing::SyncEnd { frame, ok: false });
    }
}
