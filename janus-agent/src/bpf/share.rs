//! Each target's share of the decision ring. The ring is the node's, so the programs keep a
//! tally for each target, at its slot of `TALLIES`: records charged to it (in the ring), and
//! decisions whose record they dropped, once the ring was half full with the target's share
//! (`RING_SHARE`) of it waiting, or full. The reader tells them how many records of each
//! slot it has read (`DRAINED`, at the same slot), and counts the dropped decisions as
//! decisions and as dropped lines of their guard: a flood from one container neither takes
//! the ring from the others nor makes a count wrong. A slot outlives its target's scope for
//! as long as the agent keeps the lifted guard, so the last of its tally is read too.

use aya::maps::{Array, MapData};
use janus_api::{Event, Mode, Verdict};
use janus_common::{lost_slot, Tally, LOST_SLOTS};

use super::maps::map_error;
use super::PlaceError;

pub(super) struct Shares {
    tallies: Array<MapData, Tally>,
    drained: Array<MapData, u64>,
    /// What `DRAINED` holds, by slot.
    told: Vec<u64>,
    free: Vec<u32>,
}

/// One target's slot, and its lost decisions already counted (by slot of `Tally::lost`).
pub(super) struct Share {
    slot: u32,
    lost: [u64; LOST_SLOTS],
}

impl Share {
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

/// Decisions whose record the kernel dropped: (verdict, event, mode, how many).
pub(super) type Lost = Vec<(Verdict, Event, Mode, u64)>;

impl Shares {
    /// Over the programs' maps, of one entry per slot.
    pub fn new(tallies: Array<MapData, Tally>, drained: Array<MapData, u64>) -> Shares {
        let slots = tallies.len().min(drained.len());
        Shares {
            tallies,
            drained,
            told: vec![0; slots as usize],
            free: (0..slots).rev().collect(),
        }
    }

    /// How many slots there are: the reader counts what it reads of each.
    pub fn slots(&self) -> usize {
        self.told.len()
    }

    /// A slot for a new target; an error when every slot is taken (by targets held, or
    /// lifted a short while ago). The slot's counts go on from its last target's.
    pub fn open(&mut self) -> Result<Share, PlaceError> {
        let slot = self.free.pop().ok_or(PlaceError::SharesTaken {
            slots: self.told.len(),
        })?;
        match self.tallies.get(&slot, 0) {
            Ok(tally) => Ok(Share {
                slot,
                lost: tally.lost,
            }),
            Err(e) => {
                self.free.push(slot);
                Err(map_error("TALLIES")(e))
            }
        }
    }

    /// Gives a slot back once every record charged to it has been read and its tally read
    /// for the last time; false (the slot kept) while some may still be in the ring.
    pub fn close(&mut self, share: &Share) -> bool {
        let read = self.told[share.slot as usize];
        let drained = self
            .tallies
            .get(&share.slot, 0)
            .is_ok_and(|t| t.charged == read);
        if drained {
            self.free.push(share.slot);
        }
        drained
    }

    /// Tells the programs how many records of each slot the reader has read (`read`, by
    /// slot), where that changed.
    pub fn tell(&mut self, read: &[u64]) {
        for (slot, (told, &read)) in self.told.iter_mut().zip(read).enumerate() {
            if *told != read && self.drained.set(slot as u32, read, 0).is_ok() {
                *told = read;
            }
        }
    }

    /// The target's decisions dropped since the last call.
    pub fn lost_since(&self, share: &mut Share) -> Lost {
        let Ok(tally) = self.tallies.get(&share.slot, 0) else {
            return Vec::new();
        };
        let mut lost = Vec::new();
        for event in Event::ALL {
            for mode in Mode::ALL {
                for verdict in [Verdict::Allow, Verdict::Deny] {
                    let slot = lost_slot(
                        event as usize,
                        verdict == Verdict::Deny,
                        mode == Mode::Monitor,
                    );
                    let now = tally.lost[slot];
                    let n = now.wrapping_sub(share.lost[slot]);
                    share.lost[slot] = now;
                    if n > 0 {
                        lost.push((verdict, event, mode, n));
                    }
                }
            }
        }
        lost
    }
}
