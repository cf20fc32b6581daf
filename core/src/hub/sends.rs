//! A send's way through the hub: admission through the idempotency window, the store's
//! answer (acks to every waiter), the fan-out in seq order, and messages stored by other nodes.

use super::*;

/// What an ack shows of a stored message: nothing when it is what was sent (`sent`, the send's
/// fingerprint, if it is in flight here), the stored content and attachments when a plugin
/// changed them.
fn rewrite(
    sent: Option<u64>,
    stored: u64,
    content: &str,
    attachments: &RawValue,
) -> Option<Arc<Rewrite>> {
    match sent {
        Some(sent) if sent != stored => Some(Arc::new(Rewrite {
            content: content.to_owned(),
            attachments: attachments.to_owned(),
        })),
        _ => None,
    }
}

impl Hub {
    /// Admits a `send`: checks the chat, the sizes and the idempotency window. A sender
    /// who is no longer a member is still admitted, so that a retry of a send it made while
    /// it was one gets the original ack (from the window, or from the store, which refuses
    /// anything else with `forbidden`); a user who never was one gets nothing but that.
    pub fn admit_send(
        &self,
        origin: Origin,
        user: &UserId,
        send: SendFrame,
    ) -> Result<SendAdmission, FrameError> {
        let reference = Some(send.client_msg_id.clone());
        let (chat, _) = self
            .members
            .get(&send.chat_id)
            .ok_or_else(|| FrameError::new(ErrorCode::NotFound, "no such chat"))
            .map_err(|e| e.with_ref(reference.clone()))?;
        if send.content.len() > self.limits.max_content_bytes {
            return Err(
                FrameError::new(ErrorCode::TooLarge, "content is too large").with_ref(reference)
            );
        }
        if send.attachments.len() > self.limits.max_attachments {
            return Err(
                FrameError::new(ErrorCode::TooLarge, "too many attachments").with_ref(reference)
            );
        }
        let key = IdemKey {
            sender: user.clone(),
            chat,
            client_msg_id: send.client_msg_id.into(),
        };
        let sent =
            protocol::send_fingerprint(&send.content, send.attachments.iter().map(String::as_str));
        let admission = self.sends.lock().window.admit(&key, sent, origin, now_ms());
        Ok(match admission {
            Admission::New => SendAdmission::Forward(EngineEvent::Send {
                origin,
                key,
                content: send.content,
                attachments: send.attachments,
                admitted: std::time::Instant::now(),
            }),
            Admission::Duplicate(ack) => {
                metrics::inc(&self.counters.retries_answered_from_window);
                SendAdmission::Duplicate(ack)
            }
            Admission::InFlight => SendAdmission::InFlight,
            Admission::Stale(waiters) => {
                metrics::inc(&self.counters.sends_in_flight_expired);
                let mut error = FrameError::new(
                    ErrorCode::Unavailable,
                    "an earlier attempt of this send was lost before it was stored; retry",
                )
                .with_ref(reference);
                error.retry_after_ms = Some(100);
                for w in waiters {
                    if let Origin::Conn(c) = w {
                        self.push_to(c, Outgoing::Frame(error.encode()));
                    }
                }
                return Err(error);
            }
        })
    }

    /// Forgets an admitted send that never reached the engine (queue closed or full).
    pub fn abandon_send(&self, key: &IdemKey, error: &FrameError) {
        let waiters = self.sends.lock().window.complete(key, None, now_ms());
        let frame = error
            .clone()
            .with_ref(Some(key.client_msg_id.to_string()))
            .encode();
        for w in waiters {
            // REST tickets get the error from the failed call itself or time out.
            if let Origin::Conn(c) = w {
                self.push_to(c, Outgoing::Frame(frame.clone()));
            }
        }
    }

    pub(super) fn complete_send(
        &self,
        key: IdemKey,
        result: EngineResult,
        now: u64,
        tickets: &mut Vec<(u64, TicketOutcome)>,
    ) {
        let (message_id, seq, created_at, content, attachments, duplicate) = match result {
            EngineResult::Stored {
                message_id,
                seq,
                created_at,
                content,
                attachments,
                duplicate, // the order guard below decides whether it was fanned out
            } => {
                if duplicate {
                    metrics::inc(&self.counters.retries_answered_by_store);
                }
                (message_id, seq, created_at, content, attachments, duplicate)
            }
            // A cluster node: the chat's sequencer answers it later (`deliver_stored`,
            // `answer_sends`); until then it is in flight, like a send being stored here.
            EngineResult::Deferred if self.cluster.is_some() => return,
            other => {
                let error = match other {
                    EngineResult::Failed(e) => e,
                    _ => FrameError::new(
                        ErrorCode::Internal,
                        "engine answered a send with another kind of result",
                    ),
                };
                self.answer_waiters(&key, Err(error), now, tickets, false);
                return;
            }
        };
        let stored = protocol::stored_fingerprint(&content, &attachments);
        let (ack, waiters, fan_out) = {
            let mut seq_state = self.sends.lock();
            // A retry the store answered is compared with nothing: its content may differ from
            // the first attempt's, and the ack must stay the one the first attempt got.
            let sent = seq_state.window.sent(&key).filter(|_| !duplicate);
            let ack = Arc::new(Ack {
                client_msg_id: key.client_msg_id.to_string(),
                chat_id: key.chat.to_string(),
                message_id,
                seq,
                created_at,
                rewritten: rewrite(sent, stored, &content, &attachments),
            });
            let waiters = seq_state.window.complete(&key, Some(&ack), now);
            // A store duplicate above the last seq fanned out was committed but never fanned
            // out (its batch failed after the commit, or the process restarted): fan it out now.
            let fan_out = seq_state.record_commit(&key.chat, seq).is_ok();
            (ack, waiters, fan_out)
        };
        self.push_answer(&waiters, Ok(ack.clone()), tickets);
        if !fan_out {
            return;
        }
        let message = StoredMessage {
            chat_id: &key.chat,
            seq,
            message_id: &ack.message_id,
            sender_id: &key.sender,
            content: &content,
            attachments: &attachments,
            created_at,
            client_msg_id: Some(&key.client_msg_id),
        };
        // The sending connection has its ack instead.
        self.fan_out(&key.chat, &message, &waiters);
    }

    /// Ends a send's time in flight: its waiting connections and REST tickets get the ack (also
    /// kept in the window for later retries) or the error. Returns who waited.
    pub(super) fn answer_waiters(
        &self,
        key: &IdemKey,
        outcome: Result<Arc<Ack>, FrameError>,
        now: u64,
        tickets: &mut Vec<(u64, TicketOutcome)>,
        pending_only: bool,
    ) -> Vec<Origin> {
        let waiters = {
            let window = &mut self.sends.lock().window;
            let ack = outcome.as_ref().ok().map(|a| &**a);
            if pending_only {
                window.complete_pending(key, ack, now)
            } else {
                window.complete(key, ack, now)
            }
        };
        let outcome = outcome.map_err(|e| e.with_ref(Some(key.client_msg_id.to_string())));
        self.push_answer(&waiters, outcome, tickets);
        waiters
    }

    /// The ack or the error to each waiter of a send: a frame to a connection, an outcome to a
    /// REST ticket.
    pub(super) fn push_answer(
        &self,
        waiters: &[Origin],
        outcome: Result<Arc<Ack>, FrameError>,
        tickets: &mut Vec<(u64, TicketOutcome)>,
    ) {
        if waiters.is_empty() {
            return;
        }
        let (frame, outcome) = match outcome {
            Ok(ack) => (protocol::encode_ack(&ack), TicketOutcome::Ack(ack)),
            Err(error) => (error.encode(), TicketOutcome::Failed(error)),
        };
        for w in waiters {
            match *w {
                Origin::Conn(c) => self.push_to(c, Outgoing::Frame(frame.clone())),
                Origin::Ticket(t) => tickets.push((t, outcome.clone())),
            }
        }
    }

    /// Sends another node's sequencer answered without a new message (a retry the store knew:
    /// the original ack; or a refusal): their waiters here get it, nothing is fanned out.
    pub fn answer_sends(
        &self,
        answers: Vec<(IdemKey, Result<Arc<Ack>, FrameError>)>,
    ) -> Vec<(u64, TicketOutcome)> {
        let mut tickets = Vec::new();
        let now = now_ms();
        for (key, outcome) in answers {
            if outcome.is_ok() {
                metrics::inc(&self.counters.retries_answered_by_store);
            }
            self.answer_waiters(&key, outcome, now, &mut tickets, false);
        }
        tickets
    }

    /// One stored message to every connection of its chat's members here but `skip`.
    pub(super) fn fan_out(&self, chat: &ChatId, message: &StoredMessage<'_>, skip: &[Origin]) {
        let Some((_, members)) = self.members.get(chat) else {
            return;
        };
        // Encoded once; every recipient's queue shares these bytes.
        let frame = protocol::encode_msg(message);
        let mut deliveries = 0u64;
        self.registry.for_each_conn(members.list.iter(), |c| {
            if skip.contains(&Origin::Conn(c.id)) {
                return;
            }
            deliveries += 1;
            self.count_push(c.push(Outgoing::Msg {
                chat: chat.clone(),
                seq: message.seq,
                frame: frame.clone(),
            }));
        });
        metrics::inc(&self.counters.messages_fanned_out);
        metrics::add(&self.counters.deliveries, deliveries);
    }

    /// Messages another node stored (each chat's in seq order), fanned out to the members
    /// connected here exactly like local ones (one encoding, the same order guard, the same
    /// queues and sync stitching). A send of this node's among them is acked here, and its
    /// sending connection gets the ack instead of the message. One already fanned out here is
    /// dropped; one past a gap (a relay lost the messages between) stops its chat for this
    /// call and comes back as a gap: the caller reads the missing seqs from the store and
    /// hands them over first, so a lost relay message delays, never loses. Returns the gaps
    /// and what REST tickets got.
    pub fn deliver_stored(&self, rows: &[BacklogRow]) -> (Vec<SeqGap>, Vec<(u64, TicketOutcome)>) {
        let (mut gaps, mut tickets) = (Vec::new(), Vec::new());
        let now = now_ms();
        for row in rows {
            self.apply_row(row, now, &mut gaps, &mut tickets);
        }
        (gaps, tickets)
    }

    /// What the sequenced stream says, applied in its order: a chat's members change between
    /// two of its rows exactly where the log put the change, so a member removed there gets
    /// nothing after it and one added gets everything after it, on every node. Rows and gaps
    /// as in `deliver_stored`; answers as in `answer_sends`.
    pub fn apply_sequenced(
        &self,
        items: Vec<Sequenced>,
    ) -> (Vec<SeqGap>, Vec<(u64, TicketOutcome)>) {
        let (mut gaps, mut tickets) = (Vec::new(), Vec::new());
        let now = now_ms();
        for item in items {
            match item {
                Sequenced::Members {
                    chat,
                    members,
                    direct,
                    version,
                    tell,
                    frame,
                } => {
                    let applied = self.set_chat(chat, members, direct, version);
                    if let (true, Some(frame)) = (applied, frame) {
                        self.push_to_users(&tell, &frame);
                    }
                }
                Sequenced::Row(row) => self.apply_row(&row, now, &mut gaps, &mut tickets),
                Sequenced::Answer { key, outcome } => {
                    if outcome.is_ok() {
                        metrics::inc(&self.counters.retries_answered_by_store);
                    }
                    self.answer_waiters(&key, outcome, now, &mut tickets, false);
                }
            }
        }
        (gaps, tickets)
    }

    /// One stored row from the stream: the order guard, its waiters here acked, the fan-out to
    /// the chat's members as the cache holds them now.
    fn apply_row(
        &self,
        row: &BacklogRow,
        now: u64,
        gaps: &mut Vec<SeqGap>,
        tickets: &mut Vec<(u64, TicketOutcome)>,
    ) {
        if gaps.iter().any(|g| g.chat_id == row.chat_id) {
            return;
        }
        let chat: ChatId = row.chat_id.as_str().into();
        let order = self.sends.lock().accept_remote(&chat, row.seq);
        if let RemoteOrder::Gap { last } = order {
            gaps.push(SeqGap {
                chat_id: row.chat_id.clone(),
                after: last,
                before: row.seq,
            });
            return;
        }
        // A send in flight here is acked by its row, whichever process stored it.
        let waiters = match &row.client_msg_id {
            Some(cmid) => {
                let key = IdemKey {
                    sender: row.sender_id.as_str().into(),
                    chat: chat.clone(),
                    client_msg_id: cmid.as_str().into(),
                };
                let sent = self.sends.lock().window.sent(&key);
                let stored = protocol::stored_fingerprint(&row.content, &row.attachments);
                let ack = Arc::new(Ack {
                    client_msg_id: cmid.clone(),
                    chat_id: row.chat_id.clone(),
                    message_id: row.message_id.clone(),
                    seq: row.seq,
                    created_at: row.created_at,
                    rewritten: rewrite(sent, stored, &row.content, &row.attachments),
                });
                self.answer_waiters(&key, Ok(ack), now, tickets, true)
            }
            None => Vec::new(),
        };
        if order == RemoteOrder::Next {
            self.fan_out(&chat, &row.message(), &waiters);
        }
    }

    /// Chats with a member connected here, each with the last seq fanned out here: after the
    /// relay between nodes lost messages (Redis restarted under it), the cluster layer reads
    /// what follows from the store and hands it to `deliver_stored`. A message whose relay was
    /// lost and that no later one in its chat follows would otherwise wait for a reconnect.
    pub fn fanned_out_heads(&self) -> Vec<(ChatId, u64)> {
        let heads = self.sends.lock().fanned_out();
        heads
            .into_iter()
            .filter(|(chat, _)| {
                self.members.get(chat).is_some_and(|(_, members)| {
                    members.list.iter().any(|u| self.registry.is_online(u))
                })
            })
            .collect()
    }
}
