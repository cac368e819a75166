use super::*;
use crate::Restrictions;

/// The seed's restrictions: regions [us-east-1, eu-west-1], services [s3, dynamodb].
fn seed() -> Restrictions {
    Restrictions {
        regions: vec!["us-east-1".into(), "eu-west-1".into()],
        services: vec![AwsService::S3, AwsService::DynamoDb],
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Allowed,
    /// Classified, in a region the seed does not list.
    Region,
    /// Not a documented endpoint form of a known service. (Refusal by service needs a
    /// narrower list than the seed's, which names every known service: tested below.)
    Unclassified,
    /// Regionless: admitted only with an address proof.
    Proof,
}

const TABLE: &[(&str, Want)] = &[
    // S3, regional forms.
    ("s3.us-east-1.amazonaws.com", Want::Allowed),
    ("s3.eu-west-1.amazonaws.com", Want::Allowed),
    ("S3.EU-WEST-1.AMAZONAWS.COM.", Want::Allowed),
    ("my-bucket.s3.us-east-1.amazonaws.com", Want::Allowed),
    ("my.dotted.bucket.s3.eu-west-1.amazonaws.com", Want::Allowed),
    ("s3.dualstack.eu-west-1.amazonaws.com", Want::Allowed),
    ("bucket.s3.dualstack.us-east-1.amazonaws.com", Want::Allowed),
    ("s3-fips.us-east-1.amazonaws.com", Want::Allowed),
    ("bucket.s3-fips.us-east-1.amazonaws.com", Want::Allowed),
    ("s3-fips.dualstack.us-east-1.amazonaws.com", Want::Allowed),
    ("s3-eu-west-1.amazonaws.com", Want::Allowed),
    ("bucket.s3-eu-west-1.amazonaws.com", Want::Allowed),
    ("s3.amazonaws.com", Want::Allowed),
    ("s3-external-1.amazonaws.com", Want::Allowed),
    ("bucket.s3-external-1.amazonaws.com", Want::Allowed),
    (
        "myap-123456789012.s3-accesspoint.us-east-1.amazonaws.com",
        Want::Allowed,
    ),
    (
        "myap-123456789012.s3-accesspoint.dualstack.eu-west-1.amazonaws.com",
        Want::Allowed,
    ),
    (
        "myap-123456789012.s3-accesspoint-fips.us-east-1.amazonaws.com",
        Want::Allowed,
    ),
    // DynamoDB.
    ("dynamodb.us-east-1.amazonaws.com", Want::Allowed),
    ("dynamodb.eu-west-1.amazonaws.com", Want::Allowed),
    ("dynamodb-fips.us-east-1.amazonaws.com", Want::Allowed),
    ("streams.dynamodb.eu-west-1.amazonaws.com", Want::Allowed),
    ("123456789012.ddb.us-east-1.amazonaws.com", Want::Allowed),
    ("dynamodb.eu-west-1.api.aws", Want::Allowed),
    ("dynamodb-fips.us-east-1.api.aws", Want::Allowed),
    // Known services, other regions.
    ("s3.us-west-2.amazonaws.com", Want::Region),
    ("bucket.s3.ap-southeast-2.amazonaws.com", Want::Region),
    ("s3-us-west-2.amazonaws.com", Want::Region),
    ("s3.dualstack.eu-central-1.amazonaws.com", Want::Region),
    ("dynamodb.us-west-2.amazonaws.com", Want::Region),
    ("streams.dynamodb.eu-north-1.amazonaws.com", Want::Region),
    ("123456789012.ddb.us-gov-west-1.amazonaws.com", Want::Region),
    ("s3.cn-north-1.amazonaws.com.cn", Want::Region),
    ("dynamodb.ap-south-1.api.aws", Want::Region),
    // Regionless bucket names.
    ("bucket.s3.amazonaws.com", Want::Proof),
    ("a.b.bucket.s3.amazonaws.com", Want::Proof),
    // Not an endpoint of a known service, or not a documented form.
    ("ec2-3-80-1-2.compute-1.amazonaws.com", Want::Unclassified),
    (
        "ec2-52-1-2-3.eu-west-1.compute.amazonaws.com",
        Want::Unclassified,
    ),
    ("my-lb-123.us-east-1.elb.amazonaws.com", Want::Unclassified),
    (
        "abc123.execute-api.us-east-1.amazonaws.com",
        Want::Unclassified,
    ),
    ("sqs.us-east-1.amazonaws.com", Want::Unclassified),
    ("ec2.eu-west-1.amazonaws.com", Want::Unclassified),
    ("sts.amazonaws.com", Want::Unclassified),
    ("bucket.s3-accelerate.amazonaws.com", Want::Unclassified),
    (
        "bucket.s3-accelerate.dualstack.amazonaws.com",
        Want::Unclassified,
    ),
    (
        "alias.accesspoint.s3-global.amazonaws.com",
        Want::Unclassified,
    ),
    (
        "bucket.s3-website-us-east-1.amazonaws.com",
        Want::Unclassified,
    ),
    (
        "bucket.s3-website.eu-west-1.amazonaws.com",
        Want::Unclassified,
    ),
    ("s3-control.us-east-1.amazonaws.com", Want::Unclassified),
    ("s3-accesspoint.us-east-1.amazonaws.com", Want::Unclassified),
    (
        "a.b.s3-accesspoint.us-east-1.amazonaws.com",
        Want::Unclassified,
    ),
    ("x.dynamodb.us-east-1.amazonaws.com", Want::Unclassified),
    ("12345.ddb.us-east-1.amazonaws.com", Want::Unclassified),
    ("s3.us-east-1.amazonaws.com.evil.com", Want::Unclassified),
    ("s3.us-east-1.notamazonaws.com", Want::Unclassified),
    ("s3.US_EAST_1.amazonaws.com", Want::Unclassified),
    ("s3.us-east-01.amazonaws.com", Want::Unclassified),
    ("s3.amazonaws.com.cn", Want::Unclassified),
    ("s3.us-east-1.api.aws", Want::Unclassified),
    ("amazonaws.com", Want::Unclassified),
    ("us-east-1.amazonaws.com", Want::Unclassified),
];

#[test]
fn the_seed_restrictions_over_a_table_of_names() {
    assert!(TABLE.len() >= 30);
    let r = seed();
    for (name, want) in TABLE {
        let got = r.admits(classify(name).as_ref());
        let ok = match want {
            Want::Allowed => got == Ok(Admission::Admitted),
            Want::Proof => got == Ok(Admission::NeedsRegionProof),
            Want::Region => matches!(got, Err(RestrictionMiss::Region(_))),
            Want::Unclassified => got == Err(RestrictionMiss::Unclassified),
        };
        assert!(
            ok,
            "{name}: want {want:?}, got {got:?} ({:?})",
            classify(name)
        );
    }
}

#[test]
fn classification_names_service_region_and_form() {
    let ep = classify("bucket.s3-eu-west-1.amazonaws.com");
    assert_eq!(
        ep,
        Some(AwsEndpoint {
            service: AwsService::S3,
            region: Some("eu-west-1".into()),
            form: "legacy dash-region",
        })
    );
    let ep = classify("s3.amazonaws.com").and_then(|e| e.region);
    assert_eq!(ep.as_deref(), Some("us-east-1"));
    let ep = classify("123456789012.ddb.eu-west-1.amazonaws.com");
    assert_eq!(ep.map(|e| e.service), Some(AwsService::DynamoDb));
    let ep = classify("bucket.s3.amazonaws.com");
    assert_eq!(ep.map(|e| e.region), Some(None));
}

#[test]
fn a_service_outside_the_list_is_refused_by_service() {
    let only_s3 = Restrictions {
        regions: vec!["us-east-1".into()],
        services: vec![AwsService::S3],
    };
    for name in [
        "dynamodb.us-east-1.amazonaws.com",
        "streams.dynamodb.us-east-1.amazonaws.com",
        "123456789012.ddb.us-east-1.amazonaws.com",
    ] {
        assert_eq!(
            only_s3.admits(classify(name).as_ref()),
            Err(RestrictionMiss::Service(AwsService::DynamoDb)),
            "{name}"
        );
    }
    // Service is checked before region: a DynamoDB name in another region names the service.
    assert_eq!(
        only_s3.admits(classify("dynamodb.eu-west-1.amazonaws.com").as_ref()),
        Err(RestrictionMiss::Service(AwsService::DynamoDb))
    );
    assert_eq!(
        only_s3
            .admits(classify("s3.us-east-1.amazonaws.com").as_ref())
            .map_err(|m| m.result()),
        Ok(Admission::Admitted)
    );
}

#[test]
fn an_empty_list_does_not_restrict_that_dimension() {
    let regions_only = Restrictions {
        regions: vec!["eu-west-1".into()],
        services: vec![],
    };
    assert!(
        regions_only
            .admits(classify("dynamodb.eu-west-1.amazonaws.com").as_ref())
            .is_ok()
    );
    assert_eq!(
        regions_only.admits(classify("s3.us-east-1.amazonaws.com").as_ref()),
        Err(RestrictionMiss::Region("us-east-1".into()))
    );
    // Still only the known services: the rest does not classify.
    assert_eq!(
        regions_only.admits(classify("sqs.eu-west-1.amazonaws.com").as_ref()),
        Err(RestrictionMiss::Unclassified)
    );
    let services_only = Restrictions {
        regions: vec![],
        services: vec![AwsService::S3],
    };
    assert!(
        services_only
            .admits(classify("s3.ap-east-1.amazonaws.com").as_ref())
            .is_ok()
    );
}

#[test]
fn result_labels() {
    assert_eq!(
        RestrictionMiss::Unclassified.result(),
        "restriction_unclassified"
    );
    assert_eq!(
        RestrictionMiss::Service(AwsService::S3).result(),
        "restriction_service"
    );
    assert_eq!(
        RestrictionMiss::Region("x".into()).result(),
        "restriction_region"
    );
}

#[test]
fn region_syntax() {
    for ok in [
        "us-east-1",
        "eu-west-1",
        "ap-southeast-4",
        "us-gov-west-1",
        "cn-north-1",
        "us-iso-east-1",
        "us-isob-east-1",
        "eu-isoe-west-1",
        "il-central-1",
        "ca-west-1",
        "ap-northeast-3",
    ] {
        assert!(is_region(ok), "{ok}");
    }
    for bad in [
        "",
        "us-east",
        "us-east-0",
        "us-east-01",
        "us-east-100",
        "US-EAST-1",
        "useast1",
        "usa-east-1",
        "u-east-1",
        "us-gov-1",
        "us-foo-east-1",
        "us-east-1a",
        "us-east-1-",
        "us--east-1",
        "external-1",
        "accesspoint",
        "us_east_1",
    ] {
        assert!(!is_region(bad), "{bad}");
    }
}

#[test]
fn aws_suffixes() {
    for name in [
        "amazonaws.com",
        "s3.amazonaws.com",
        "x.amazonaws.com.cn",
        "dynamodb.us-east-1.api.aws",
        "S3.AMAZONAWS.COM.",
    ] {
        assert!(is_under_aws_suffix(name), "{name}");
    }
    for name in [
        "notamazonaws.com",
        "amazonaws.com.evil.com",
        "api.aws.example",
        "aws",
    ] {
        assert!(!is_under_aws_suffix(name), "{name}");
    }
}

#[test]
fn services_parse_from_a_closed_list() {
    assert_eq!(AwsService::parse("s3"), Some(AwsService::S3));
    assert_eq!(AwsService::parse("DynamoDB"), Some(AwsService::DynamoDb));
    assert_eq!(AwsService::parse("ec2"), None);
    assert_eq!(AwsService::parse("s3-control"), None);
    assert_eq!(AwsService::S3.ip_ranges_name(), "S3");
    assert_eq!(AwsService::DynamoDb.ip_ranges_name(), "DYNAMODB");
}
