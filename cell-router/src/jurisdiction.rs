//! Jurisdictions: named, disjoint sets of regions. A tenant's data may only live in cells
//! whose region belongs to the tenant's jurisdiction.

use std::collections::{BTreeMap, BTreeSet};

use crate::DirectoryError;

/// The longest jurisdiction or region name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Named region sets, for example `eu = {eu-west-1, eu-central-1}`.
///
/// Names and regions are 1 to [`MAX_NAME_LEN`] bytes of `[a-z0-9-]`. A region belongs to
/// at most one jurisdiction, so every region answers [`Jurisdictions::of_region`] with a
/// single name. A jurisdiction may have no regions yet; its tenants are then unplaceable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jurisdictions {
    /// Jurisdiction name to its regions.
    regions: BTreeMap<String, BTreeSet<String>>,
    /// Region to the one jurisdiction it belongs to (the inverse of `regions`).
    owner: BTreeMap<String, String>,
}

impl Jurisdictions {
    /// An empty set of jurisdictions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `regions` to the jurisdiction `name`, creating it if it is new.
    ///
    /// Fails with [`DirectoryError::InvalidName`] for a malformed name or region and with
    /// [`DirectoryError::RegionInTwoJurisdictions`] for a region that already belongs to
    /// another jurisdiction. On error nothing is changed.
    pub fn insert(
        &mut self,
        name: &str,
        regions: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<(), DirectoryError> {
        check_name(name)?;
        let regions: Vec<String> = regions.into_iter().map(Into::into).collect();
        for region in &regions {
            check_name(region)?;
            match self.owner.get(region) {
                Some(owner) if owner != name => {
                    return Err(DirectoryError::RegionInTwoJurisdictions(region.clone()));
                }
                _ => {}
            }
        }
        // Within one call a region may be repeated harmlessly; across jurisdictions it was
        // rejected above, so the two maps stay inverse to each other.
        let set = self.regions.entry(name.to_owned()).or_default();
        for region in regions {
            self.owner.insert(region.clone(), name.to_owned());
            set.insert(region);
        }
        Ok(())
    }

    /// Parses `"eu=eu-west-1,eu-central-1;us=us-east-1,us-west-2"`.
    ///
    /// Jurisdictions are separated by `;`, a name is followed by `=` and a comma-separated
    /// list of regions (possibly empty); whitespace around items and a trailing `;` are
    /// ignored. A name listed twice is a [`DirectoryError::Parse`] error; malformed names
    /// and shared regions fail as in [`Jurisdictions::insert`].
    pub fn parse(text: &str) -> Result<Self, DirectoryError> {
        let mut jurisdictions = Self::new();
        for entry in text
            .split(';')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let Some((name, list)) = entry.split_once('=') else {
                return Err(DirectoryError::Parse(format!(
                    "expected `name=region,...`, got {entry:?}"
                )));
            };
            let name = name.trim();
            if jurisdictions.contains(name) {
                return Err(DirectoryError::Parse(format!(
                    "jurisdiction {name:?} is listed twice"
                )));
            }
            let regions: Vec<&str> = if list.trim().is_empty() {
                Vec::new()
            } else {
                list.split(',').map(str::trim).collect()
            };
            jurisdictions.insert(name, regions)?;
        }
        Ok(jurisdictions)
    }

    /// Whether a jurisdiction of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.regions.contains_key(name)
    }

    /// The regions of a jurisdiction, or `None` if it does not exist.
    pub fn regions(&self, name: &str) -> Option<&BTreeSet<String>> {
        self.regions.get(name)
    }

    /// The jurisdiction a region belongs to, or `None` if no jurisdiction lists it.
    pub fn of_region(&self, region: &str) -> Option<&str> {
        self.owner.get(region).map(String::as_str)
    }

    /// Jurisdiction names, in ascending order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.regions.keys().map(String::as_str)
    }
}

/// Checks a jurisdiction or region name: 1 to [`MAX_NAME_LEN`] bytes of `[a-z0-9-]`.
pub(crate) fn check_name(name: &str) -> Result<(), DirectoryError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
    if valid {
        Ok(())
    } else {
        Err(DirectoryError::InvalidName(format!(
            "{name:?}: a jurisdiction or region name is 1 to {MAX_NAME_LEN} bytes of [a-z0-9-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_answers_lookups() {
        let parsed =
            Jurisdictions::parse(" eu = eu-west-1, eu-central-1 ; us=us-east-1,us-west-2;")
                .unwrap();
        assert_eq!(parsed.names().collect::<Vec<_>>(), ["eu", "us"]);
        assert!(parsed.contains("eu"));
        assert!(!parsed.contains("apac"));
        assert_eq!(parsed.of_region("eu-central-1"), Some("eu"));
        assert_eq!(parsed.of_region("us-west-2"), Some("us"));
        assert_eq!(parsed.of_region("ap-south-1"), None);
        let eu: Vec<&str> = parsed
            .regions("eu")
            .unwrap()
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(eu, ["eu-central-1", "eu-west-1"]);

        let mut built = Jurisdictions::new();
        built.insert("us", ["us-west-2", "us-east-1"]).unwrap();
        built.insert("eu", vec!["eu-west-1".to_owned()]).unwrap();
        built.insert("eu", ["eu-central-1", "eu-west-1"]).unwrap();
        assert_eq!(built, parsed);
    }

    #[test]
    fn empty_text_and_empty_jurisdictions_are_allowed() {
        assert_eq!(Jurisdictions::parse("").unwrap(), Jurisdictions::new());
        let parsed = Jurisdictions::parse("eu=").unwrap();
        assert!(parsed.contains("eu"));
        assert!(parsed.regions("eu").unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_text() {
        for text in [
            "eu",
            "eu=a;;us",
            "=eu-west-1",
            "eu=eu-west-1,",
            "EU=eu-west-1",
            "eu=eu_west",
        ] {
            assert!(Jurisdictions::parse(text).is_err(), "{text:?} parsed");
        }
        assert!(matches!(
            Jurisdictions::parse("eu=a;eu=b"),
            Err(DirectoryError::Parse(_))
        ));
        assert!(matches!(
            Jurisdictions::parse(&format!("eu={}", "x".repeat(MAX_NAME_LEN + 1))),
            Err(DirectoryError::InvalidName(_))
        ));
    }

    #[test]
    fn a_region_belongs_to_one_jurisdiction_and_errors_change_nothing() {
        assert_eq!(
            Jurisdictions::parse("eu=eu-west-1;us=eu-west-1"),
            Err(DirectoryError::RegionInTwoJurisdictions("eu-west-1".into()))
        );
        let mut jurisdictions = Jurisdictions::parse("eu=eu-west-1").unwrap();
        let before = jurisdictions.clone();
        assert!(
            jurisdictions
                .insert("us", ["us-east-1", "eu-west-1"])
                .is_err()
        );
        assert!(jurisdictions.insert("us", ["us-east-1", "Bad"]).is_err());
        assert_eq!(jurisdictions, before);
    }
}
