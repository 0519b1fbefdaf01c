//! Group membership: stored by the writer, held in memory for sends.

use std::sync::Arc;

use hongbao_boundary::sync::{read, write};
use hongbao_boundary::EngineError;
use hongbao_core::limits::GROUP_MEMBERS_MAX;
use hongbao_core::{GroupId, UserId};
use hongbao_store::ops::{ChangeGroup, GroupChange};

use super::Engine;
use crate::checks::{op_error, valid_group, valid_user};

impl Engine {
    /// Replaces a group's members (at most `GROUP_MEMBERS_MAX`).
    pub async fn set_group(&self, group: GroupId, members: Vec<UserId>) -> Result<Vec<UserId>, EngineError> {
        self.change_group(group, GroupChange::Replace(members)).await
    }

    pub async fn add_members(&self, group: GroupId, members: Vec<UserId>) -> Result<Vec<UserId>, EngineError> {
        self.change_group(group, GroupChange::Add(members)).await
    }

    pub async fn remove_members(&self, group: GroupId, members: Vec<UserId>) -> Result<Vec<UserId>, EngineError> {
        self.change_group(group, GroupChange::Remove(members)).await
    }

    pub fn group(&self, group: GroupId) -> Option<Vec<UserId>> {
        read(&self.parts.groups).get(&group).map(|m| m.to_vec())
    }

    async fn change_group(&self, group: GroupId, change: GroupChange) -> Result<Vec<UserId>, EngineError> {
        valid_group(group)?;
        let (GroupChange::Replace(users) | GroupChange::Add(users) | GroupChange::Remove(users)) = &change;
        for &u in users {
            valid_user(u)?;
        }
        let adding = matches!(change, GroupChange::Replace(_) | GroupChange::Add(_));
        if adding && users.len() > GROUP_MEMBERS_MAX {
            return Err(EngineError::Invalid(format!("a group holds at most {GROUP_MEMBERS_MAX} members")));
        }
        // The map must change in commit order. Group changes are rare admin
        // calls, so one at a time (not the map's lock: holding that across
        // the commit would block every send); the map then takes the
        // committed list.
        let _one_at_a_time = self.parts.group_control.lock().await;
        let members = self.parts.writer.run(ChangeGroup { group, change }).await.map_err(op_error)?;
        let mut groups = write(&self.parts.groups);
        if members.is_empty() {
            groups.remove(&group);
        } else {
            groups.insert(group, Arc::from(members.clone()));
        }
        Ok(members)
    }
}
